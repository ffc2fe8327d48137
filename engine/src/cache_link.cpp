#include "cache_link.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>

namespace adpop {

namespace {
constexpr std::int64_t kMinBackoffNs = 100'000'000;    // 100 ms
constexpr std::int64_t kMaxBackoffNs = 2'000'000'000;  // 2 s
constexpr std::size_t kMaxReplyItems = 1 << 20;

bool read_line(std::string_view in, std::size_t* pos, std::string_view* line) {
  const std::size_t end = in.find("\r\n", *pos);
  if (end == std::string_view::npos) return false;
  *line = in.substr(*pos, end - *pos);
  *pos = end + 2;
  return true;
}

bool to_int(std::string_view s, std::int64_t* out) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && p == s.data() + s.size();
}
}  // namespace

bool parse_resp(std::string_view in, std::size_t* pos, RespValue* out, bool* bad, int depth) {
  if (*pos >= in.size()) return false;
  if (depth > 4) {
    *bad = true;
    return false;
  }
  std::size_t p = *pos;
  const char type = in[p++];
  std::string_view line;
  if (!read_line(in, &p, &line)) return false;
  switch (type) {
    case '+':
    case '-':
      out->kind = type == '+' ? RespValue::Kind::kString : RespValue::Kind::kError;
      out->text = line;
      break;
    case ':':
      out->kind = RespValue::Kind::kInteger;
      if (!to_int(line, &out->integer)) *bad = true;
      break;
    case '$': {
      std::int64_t n = 0;
      if (!to_int(line, &n) || n < -1) {
        *bad = true;
        return false;
      }
      if (n == -1) {
        out->kind = RespValue::Kind::kNil;
        break;
      }
      if (in.size() - p < static_cast<std::size_t>(n) + 2) return false;
      out->kind = RespValue::Kind::kString;
      out->text = in.substr(p, static_cast<std::size_t>(n));
      p += static_cast<std::size_t>(n) + 2;
      break;
    }
    case '*': {
      std::int64_t n = 0;
      if (!to_int(line, &n) || n < -1 || n > static_cast<std::int64_t>(kMaxReplyItems)) {
        *bad = true;
        return false;
      }
      out->kind = n == -1 ? RespValue::Kind::kNil : RespValue::Kind::kArray;
      out->items.clear();
      for (std::int64_t i = 0; i < n; ++i) {
        RespValue item;
        if (!parse_resp(in, &p, &item, bad, depth + 1)) return false;
        out->items.push_back(std::move(item));
      }
      break;
    }
    default:
      *bad = true;
      return false;
  }
  if (*bad) return false;
  *pos = p;
  return true;
}

CacheLink::CacheLink(Endpoint endpoint, std::uint32_t timeout_ms, std::string password)
    : endpoint_(std::move(endpoint)),
      timeout_ns_(std::int64_t{timeout_ms} * 1'000'000),
      password_(std::move(password)) {}

CacheLink::~CacheLink() {
  if (fd_ >= 0) ::close(fd_);
}

void CacheLink::drop(int epoll_fd) {
  if (fd_ >= 0) {
    epoll_ctl(epoll_fd, EPOLL_CTL_DEL, fd_, nullptr);
    ::close(fd_);
  }
  fd_ = -1;
  connected_ = false;
  want_write_ = false;
  out_.clear();
  in_.clear();
  // Callbacks may queue new commands: they see a link that is down and fail at once.
  std::deque<Pending> failing;
  failing.swap(pending_);
  for (auto& p : failing) {
    ++failed_;
    if (p.done) p.done(nullptr);
  }
}

void CacheLink::tick(std::int64_t now_ns, int epoll_fd) {
  if (fd_ >= 0 && !pending_.empty() && now_ns - pending_.front().sent_ns > timeout_ns_) {
    // Slow or stopped: what it has not answered is given up, and it is tried again later.
    drop(epoll_fd);
    backoff_ns_ = std::clamp<std::int64_t>(backoff_ns_ * 2, kMinBackoffNs, kMaxBackoffNs);
    retry_at_ns_ = now_ns + backoff_ns_;
    return;
  }
  if (fd_ >= 0 || now_ns < retry_at_ns_) return;
  sockaddr_storage addr{};
  socklen_t len = 0;
  std::string host = endpoint_.host;
  if (!host.empty() && host.front() == '[') host = host.substr(1, host.size() - 2);
  auto* v4 = reinterpret_cast<sockaddr_in*>(&addr);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&addr);
  if (inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(endpoint_.port);
    len = sizeof *v4;
  } else if (inet_pton(AF_INET6, host.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(endpoint_.port);
    len = sizeof *v6;
  } else {
    retry_at_ns_ = now_ns + kMaxBackoffNs;  // checked at start-up: cannot happen
    return;
  }
  fd_ = ::socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd_ < 0) {
    retry_at_ns_ = now_ns + kMaxBackoffNs;
    return;
  }
  int one = 1;
  setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), len) != 0 && errno != EINPROGRESS) {
    ::close(fd_);
    fd_ = -1;
    backoff_ns_ = std::clamp<std::int64_t>(backoff_ns_ * 2, kMinBackoffNs, kMaxBackoffNs);
    retry_at_ns_ = now_ns + backoff_ns_;
    return;
  }
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
  ev.data.fd = fd_;
  epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd_, &ev);
  want_write_ = true;
  // Until the connect completes it counts as a command: a cache that never answers the
  // handshake is dropped like one that never answers a command.
  pending_.push_back({now_ns, {}});
  connected_ = false;
  retry_at_ns_ = now_ns;  // set again on failure
}

void CacheLink::on_event(std::uint32_t events, std::int64_t now_ns, int epoll_fd) {
  if (fd_ < 0) return;
  if (!connected_ && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(fd_, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0 || (events & (EPOLLERR | EPOLLHUP))) {
      drop(epoll_fd);
      backoff_ns_ = std::clamp<std::int64_t>(backoff_ns_ * 2, kMinBackoffNs, kMaxBackoffNs);
      retry_at_ns_ = now_ns + backoff_ns_;
      return;
    }
    connected_ = true;
    ++connects_;
    backoff_ns_ = 0;
    pending_.pop_front();  // the connect's own entry
    if (!password_.empty()) {
      // Ahead of everything else on this connection; a refusal drops it (and is said once:
      // the password file and the cache's disagree until someone fixes one of them).
      send({"AUTH", password_}, now_ns, [this, epoll_fd, now_ns](const RespValue* reply) {
        if (!reply || reply->kind != RespValue::Kind::kError) return;
        if (!refused_logged_)
          std::fprintf(stderr,
                       "adpop-engine: the cache at %s refused AUTH (%.*s); check --cache-password-file\n",
                       endpoint_.text().c_str(),
                       static_cast<int>(std::min<std::size_t>(reply->text.size(), 80)), reply->text.data());
        refused_logged_ = true;
        drop(epoll_fd);
        retry_at_ns_ = now_ns + kMaxBackoffNs;
      });
    }
  }
  if (connected_ && (events & EPOLLOUT)) flush(epoll_fd);
  if (connected_ && (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) read_replies(epoll_fd);
}

void CacheLink::read_replies(int epoll_fd) {
  char buf[65536];
  bool closed = false;
  while (true) {
    ssize_t n = recv_raw(fd_, buf, sizeof buf);
    if (n > 0) {
      in_.append(buf, static_cast<std::size_t>(n));
      continue;
    }
    if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) closed = true;
    if (n < 0 && errno == EINTR) continue;
    break;
  }
  std::size_t pos = 0;
  while (!pending_.empty()) {
    RespValue reply;
    bool bad = false;
    std::size_t at = pos;
    if (!parse_resp(in_, &at, &reply, &bad)) {
      if (bad) closed = true;
      break;
    }
    pos = at;
    Pending p = std::move(pending_.front());
    pending_.pop_front();
    if (p.done) p.done(&reply);
    if (fd_ < 0) return;  // a callback dropped the link
  }
  in_.erase(0, pos);
  if (closed) {
    drop(epoll_fd);
    retry_at_ns_ = 0;
  }
}

void CacheLink::send(const std::vector<std::string_view>& args, std::int64_t now_ns, Callback done) {
  if (!up()) {
    ++failed_;
    if (done) done(nullptr);
    return;
  }
  char head[32];
  auto n = std::snprintf(head, sizeof head, "*%zu\r\n", args.size());
  out_.append(head, static_cast<std::size_t>(n));
  for (std::string_view a : args) {
    n = std::snprintf(head, sizeof head, "$%zu\r\n", a.size());
    out_.append(head, static_cast<std::size_t>(n));
    out_.append(a);
    out_ += "\r\n";
  }
  pending_.push_back({now_ns, std::move(done)});
}

void CacheLink::flush(int epoll_fd) {
  if (!up() || out_.empty()) return;
  std::size_t off = 0;
  while (off < out_.size()) {
    ssize_t n = send_raw(fd_, out_.data() + off, out_.size() - off);
    if (n > 0) {
      off += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;  // EPOLLOUT resumes it
    drop(epoll_fd);
    return;
  }
  out_.erase(0, off);
}

}  // namespace adpop
