#include "server.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>

#include "api.hpp"
#include "json.hpp"

namespace adpop {

namespace {

std::int64_t mono_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

// Shard threads are never cancelled, so they call recv and send through syscall(2): glibc's
// recv and send are cancellation points that toggle the thread's cancel state on every call,
// a measurable share of a request's user time.
ssize_t recv_raw(int fd, void* buf, std::size_t len) {
  return syscall(SYS_recvfrom, fd, buf, len, 0, nullptr, nullptr);
}
ssize_t send_raw(int fd, const void* buf, std::size_t len) {
  return syscall(SYS_sendto, fd, buf, len, MSG_NOSIGNAL, nullptr, 0);
}

constexpr std::size_t kMaxOutput = 1 << 20;  // stop reading a connection that will not read

const char* status_text(int code) {
  switch (code) {
    case 200:
      return "OK";
    case 204:
      return "No Content";
    case 400:
      return "Bad Request";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 408:
      return "Request Timeout";
    case 413:
      return "Content Too Large";
    case 431:
      return "Request Header Fields Too Large";
    case 501:
      return "Not Implemented";
    case 503:
      return "Service Unavailable";
    case 505:
      return "HTTP Version Not Supported";
    default:
      return "Error";
  }
}

// Plain appends rather than snprintf: this runs for every answer.
void append_response(std::string& out, int code, std::string_view type, std::string_view body, bool close) {
  char num[24];
  out += "HTTP/1.1 ";
  out.append(num, static_cast<std::size_t>(std::to_chars(num, num + sizeof num, code).ptr - num));
  out.push_back(' ');
  out += status_text(code);
  out += "\r\nContent-Type: ";
  out += type;
  out += "\r\nContent-Length: ";
  out.append(num, static_cast<std::size_t>(std::to_chars(num, num + sizeof num, body.size()).ptr - num));
  out += close ? "\r\nConnection: close\r\n\r\n" : "\r\n\r\n";
  out.append(body);
}

ErrorReason reason_from_parser(const char* name) {
  std::string_view r(name);
  if (r == "bad_header") return kErrBadHeader;
  if (r == "bad_content_length") return kErrBadContentLength;
  if (r == "headers_too_large") return kErrHeadersTooLarge;
  if (r == "too_many_headers") return kErrTooManyHeaders;
  if (r == "body_too_large") return kErrBodyTooLarge;
  if (r == "transfer_encoding") return kErrTransferEncoding;
  if (r == "bad_version") return kErrBadVersion;
  return kErrBadRequestLine;
}

const char* kRouteNames[kRoutes] = {"decide_get", "decide_post", "impression", "click",
                                    "healthz",    "metrics",     "other"};

// A non-blocking listening socket on `ep`, or -1 with `error` set. "::" takes IPv4 too (dual
// stack); any other IPv6 address only IPv6, so an IPv4 address beside it can share the port.
int open_listener(const Endpoint& ep, bool reuseport, int rcvbuf, std::string* error) {
  const bool v6 = ep.host.find(':') != std::string::npos;
  sockaddr_storage storage{};
  socklen_t length = 0;
  bool parsed = false;
  if (v6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&storage);
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(ep.port);
    parsed = inet_pton(AF_INET6, ep.host.c_str(), &a->sin6_addr) == 1;
    length = sizeof *a;
  } else {
    auto* a = reinterpret_cast<sockaddr_in*>(&storage);
    a->sin_family = AF_INET;
    a->sin_port = htons(ep.port);
    parsed = inet_pton(AF_INET, ep.host.c_str(), &a->sin_addr) == 1;
    length = sizeof *a;
  }
  if (!parsed) {
    *error = "not an IPv4 or IPv6 address: " + ep.text();
    return -1;
  }
  const int fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    *error = std::string("socket: ") + std::strerror(errno);
    return -1;
  }
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (reuseport) setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  if (rcvbuf > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  if (v6) {
    const int only = ep.host == "::" ? 0 : 1;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &only, sizeof only);
  }
  if (bind(fd, reinterpret_cast<sockaddr*>(&storage), length) != 0 || listen(fd, 4096) != 0) {
    *error = "bind " + ep.text() + ": " + std::strerror(errno);
    ::close(fd);
    return -1;
  }
  return fd;
}

void watch_listener(int epoll_fd, int fd) {
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = fd;
  epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &ev);
}

std::uint64_t wall_ms() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000 + static_cast<std::uint64_t>(ts.tv_nsec / 1000000);
}

// The ad named by (campaign id, ad id) in `snap`, or -1. Campaigns are sorted by id and
// each owns a short run of ads, so this is a binary search and a tiny scan.
std::int64_t find_ad(const Snapshot& snap, std::string_view campaign, std::string_view ad) {
  const auto campaigns = snap.campaigns();
  const std::int64_t found = find_by_id(snap, campaigns, campaign);
  if (found < 0) return -1;
  const auto c = campaigns[static_cast<std::uint32_t>(found)];
  const auto ads = snap.ads();
  for (std::uint32_t a = c.getAdsStart(); a < c.getAdsStart() + c.getAdsCount(); ++a)
    if (compare_bytes(snap.str(ads[a].getId()), ad) == 0) return a;
  return -1;
}

std::string_view query_param(std::string_view query, std::string_view name) {
  while (!query.empty()) {
    std::size_t amp = query.find('&');
    std::string_view pair = query.substr(0, amp);
    if (pair.size() > name.size() && pair.substr(0, name.size()) == name && pair[name.size()] == '=')
      return pair.substr(name.size() + 1);
    if (amp == std::string_view::npos) break;
    query.remove_prefix(amp + 1);
  }
  return {};
}

}  // namespace

std::string Endpoint::text() const {
  const bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

bool parse_endpoint(std::string_view text, Endpoint* out, std::string* error) {
  const std::size_t colon = text.rfind(':');
  std::string_view host = colon == std::string_view::npos ? std::string_view{} : text.substr(0, colon);
  const std::string_view port = colon == std::string_view::npos ? std::string_view{} : text.substr(colon + 1);
  const bool bracketed = host.size() >= 2 && host.front() == '[' && host.back() == ']';
  if (bracketed) host = host.substr(1, host.size() - 2);
  unsigned value = 0;
  auto r = std::from_chars(port.data(), port.data() + port.size(), value);
  if (host.empty() || port.empty() || r.ec != std::errc{} || r.ptr != port.data() + port.size() ||
      value > 65535 || (!bracketed && host.find(':') != std::string_view::npos)) {
    *error = "expected HOST:PORT or [IPV6]:PORT, got '" + std::string(text) + "'";
    return false;
  }
  unsigned char buf[16];
  const std::string h(host);
  if (inet_pton(bracketed ? AF_INET6 : AF_INET, h.c_str(), buf) != 1) {
    *error = "'" + h + "' is not an " + (bracketed ? "IPv6" : "IPv4") +
             " address (IPv6 goes in brackets: [::]:8080)";
    return false;
  }
  *out = Endpoint{h, static_cast<std::uint16_t>(value)};
  return true;
}

const char* error_reason_name(ErrorReason r) {
  static const char* names[kErrReasons] = {"bad_request_line",   "bad_header",       "bad_content_length",
                                           "headers_too_large",  "too_many_headers", "body_too_large",
                                           "transfer_encoding",  "bad_version",      "timeout",
                                           "bad_json",           "bad_field",        "not_found",
                                           "method_not_allowed", "no_snapshot",      "explain_forbidden",
                                           "connection_cap",     "draining",         "token_malformed",
                                           "token_forged",       "token_expired",    "unknown_ad",
                                           "first_byte_timeout", "idle_evicted"};
  return r < kErrReasons ? names[r] : "unknown";
}

int LatencyHistogram::bucket_of(std::uint64_t ns) {
  if (ns < 8) return 0;
  int log = 63 - __builtin_clzll(ns);  // >= 3
  int sub = static_cast<int>((ns >> (log - 3)) & 7);
  int b = (log - 3) * 8 + sub;
  return std::min(b, kBuckets - 1);
}

std::uint64_t LatencyHistogram::upper_ns(int bucket) {
  int log = bucket / 8 + 3;
  int sub = bucket % 8;
  return static_cast<std::uint64_t>(8 + sub + 1) << (log - 3);
}

// ------------------------------------------------------------------------------------------
// Shard

struct Shard::Conn {
  int fd = -1;
  std::string in;
  std::string out;
  std::size_t out_off = 0;
  std::int64_t last_active_ns = 0;
  std::int64_t request_start_ns = 0;  // first byte of an unfinished request, 0 if none
  bool close_after = false;
  bool closed = true;
  // Accepted while draining: gets health and metrics, but no new decisions.
  bool accepted_draining = false;
  bool metrics_only = false;  // came in on the metrics address: /metrics and /healthz only
  bool sent_any = false;      // has sent at least one byte since it was accepted
  bool read_pending = false;  // reading stopped for backpressure before the socket drained
  bool dirty = false;         // has answers waiting for the end of the event batch
};

Shard::Shard(Engine& engine, std::uint32_t index, int cpu)
    : engine_(engine),
      index_(index),
      cpu_(cpu),
      spool_(std::make_unique<Spool>(engine.options().spool_dir, index, engine.options().spool_segment_bytes,
                                     engine.options().spool_segment_age_s)) {}

Shard::~Shard() {
  for (auto& c : conns_)
    if (c && !c->closed) ::close(c->fd);
  for (int fd : listen_fds_) ::close(fd);
  if (metrics_fd_ >= 0) ::close(metrics_fd_);
  if (epoll_fd_ >= 0) ::close(epoll_fd_);
}

bool Shard::start(std::string* error) {
  const EngineOptions& o = engine_.options();
  cap_ = std::max<std::uint32_t>(1, o.max_connections / std::max<std::uint32_t>(1, o.shards));
  // A fixed receive buffer (inherited by accepted sockets) that holds the largest request we
  // accept: ad requests are small, so the kernel's per-read buffer autotuning is work for
  // nothing, and a flood of connections cannot grow their buffers.
  const int rcvbuf =
      static_cast<int>(std::max<std::size_t>(64 * 1024, o.http.max_header_bytes + o.http.max_body_bytes));
  for (const Endpoint& ep : o.listen) {
    // Each shard has its own listener on the same port: the kernel spreads connections, and
    // no accept queue is shared between threads.
    const int fd = open_listener(ep, true, rcvbuf, error);
    if (fd < 0) return false;
    listen_fds_.push_back(fd);
  }
  // One shard answers the scrapes: they are rare, and one listener needs no SO_REUSEPORT.
  if (index_ == 0 && o.metrics.port != 0) {
    metrics_fd_ = open_listener(o.metrics, false, 0, error);
    if (metrics_fd_ < 0) return false;
  }
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  if (epoll_fd_ < 0) {
    *error = std::string("epoll_create1: ") + std::strerror(errno);
    return false;
  }
  for (int fd : listen_fds_) watch_listener(epoll_fd_, fd);
  if (metrics_fd_ >= 0) watch_listener(epoll_fd_, metrics_fd_);
  thread_ = std::thread([this] { run(); });
  return true;
}

void Shard::join() {
  if (thread_.joinable()) thread_.join();
}

void Shard::run() {
  if (cpu_ >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu_, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
  }
  char name[16];
  std::snprintf(name, sizeof name, "shard-%u", index_);
  pthread_setname_np(pthread_self(), name);
  epoll_event events[256];
  std::int64_t last_tick = mono_ns();
  std::int64_t last_event = 0;
  // The first batch's idle time is measured from here, not from the clock's epoch.
  batch_ns_ = last_tick;
  const std::int64_t idle_poll_ns = std::int64_t{engine_.options().idle_poll_us} * 1000;
  // Polling pays on a busy shard only: there it saves the wakeup every new packet would cost
  // both sides. A shard idle for much of its time has the CPU to pay for wakeups, and
  // polling would keep that CPU from ever halting: wasted on a shared core, and on a virtual
  // machine a vCPU that never halts is the one its host preempts for milliseconds. So a
  // shard polls only while it waited for under a quarter of the last tick.
  bool polling = idle_poll_ns > 0;
  stats_.polling.value.store(polling ? 1 : 0, std::memory_order_relaxed);
  std::int64_t waited_in_tick = 0;
  std::int64_t loop_end = last_tick;
  while (!engine_.stopping()) {
    // Sleeping costs both sides: the client's next packet must wake this thread (an IPI and
    // a context switch). Right after work, poll instead, for at most idle_poll_ns.
    const bool poll = polling && batch_ns_ - last_event < idle_poll_ns;
    int n = epoll_wait(epoll_fd_, events, 256, poll ? 0 : 100);
    // One clock read per batch for wall time: decisions and records need seconds and
    // milliseconds, and a batch takes well under a millisecond.
    const std::int64_t previous_ns = batch_ns_;
    batch_ns_ = mono_ns();
    waited_in_tick += batch_ns_ - loop_end;
    // An empty poll is CPU spent waiting: counted, so the work's own cost can be told apart.
    if (poll && n == 0) stats_.idle_poll_ns.add(static_cast<std::uint64_t>(batch_ns_ - previous_ns));
    batch_wall_ms_ = static_cast<std::int64_t>(wall_ms());
    if (n > 0) last_event = batch_ns_;
    // Publish the generation this batch starts from: every request in it takes the current
    // snapshot, never an older one, and between batches the shard holds none. The admin
    // thread frees a retired snapshot once every shard has published a generation past it.
    stats_.seen_generation.store(engine_.generation(), std::memory_order_release);
    for (int i = 0; i < n; ++i) {
      int fd = events[i].data.fd;
      if (is_listener(fd)) {
        accept_all(fd);
        continue;
      }
      if (fd < 0 || static_cast<std::size_t>(fd) >= conns_.size() || !conns_[fd] || conns_[fd]->closed)
        continue;
      Conn& c = *conns_[fd];
      if (events[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        on_readable(c, (events[i].events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0);
      // Writable again: its pending output goes out with the batch, after the spool write
      // (never before: an answer must not leave ahead of its event record).
      if (!c.closed && (events[i].events & EPOLLOUT) && c.out.size() > c.out_off) mark_dirty(c);
    }
    // Spool, then answers. A connection held back by a full output buffer gets its waiting
    // requests processed once it drains, which queues more answers: repeat until none.
    while (!dirty_.empty()) {
      flush_spool(batch_wall_ms_ / 1000);
      sending_.swap(dirty_);
      for (int fd : sending_) {
        Conn& c = *conns_[static_cast<std::size_t>(fd)];
        c.dirty = false;
        if (c.closed) continue;
        flush(c);
        if (c.closed || c.out.size() - c.out_off >= kMaxOutput / 2) continue;
        if (!c.in.empty()) process(c);
        if (!c.closed && c.read_pending) on_readable(c, false);
      }
      sending_.clear();
    }
    loop_end = mono_ns();
    if (loop_end - last_tick > 100'000'000) {
      polling = idle_poll_ns > 0 && waited_in_tick * 4 < loop_end - last_tick;
      stats_.polling.value.store(polling ? 1 : 0, std::memory_order_relaxed);
      waited_in_tick = 0;
      tick(loop_end);
      last_tick = loop_end;
    }
  }
}

bool Shard::is_listener(int fd) const {
  if (fd == metrics_fd_) return true;
  for (int l : listen_fds_)
    if (fd == l) return true;
  return false;
}

// At the cap, idle connections (nothing pending either way) are closed oldest first, a
// sixteenth of the cap in one pass, so that sockets held open doing nothing can never lock
// clients out, and a flood of new connections does not pay a scan each. False when none is
// idle: then the cap holds.
bool Shard::evict_idle() {
  std::vector<std::pair<std::int64_t, int>> idle;
  for (auto& p : conns_)
    if (p && !p->closed && p->in.empty() && p->out.size() == p->out_off)
      idle.emplace_back(p->last_active_ns, p->fd);
  if (idle.empty()) return false;
  const std::size_t batch = std::min<std::size_t>(idle.size(), std::max<std::uint32_t>(1, cap_ / 16));
  std::nth_element(idle.begin(), idle.begin() + static_cast<std::ptrdiff_t>(batch - 1), idle.end());
  for (std::size_t i = 0; i < batch; ++i) {
    stats_.errors[kErrIdleEvicted].add();
    close_conn(*conns_[static_cast<std::size_t>(idle[i].second)]);
  }
  return true;
}

void Shard::accept_all(int listen_fd) {
  while (true) {
    int fd = accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;  // EAGAIN, or an error the next readiness will repeat
    if (open_ >= cap_ && !evict_idle()) {
      // Over the cap with every connection busy: refuse at once rather than queue work this
      // shard cannot do.
      stats_.errors[kErrConnectionCap].add();
      ::close(fd);
      continue;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (static_cast<std::size_t>(fd) >= conns_.size()) conns_.resize(static_cast<std::size_t>(fd) + 64);
    if (!conns_[fd]) conns_[fd] = std::make_unique<Conn>();
    Conn& c = *conns_[fd];
    c.fd = fd;
    c.in.clear();
    c.out.clear();
    c.out_off = 0;
    c.close_after = false;
    c.closed = false;
    c.metrics_only = listen_fd == metrics_fd_;
    c.sent_any = false;
    c.last_active_ns = mono_ns();
    c.request_start_ns = 0;
    c.accepted_draining = engine_.draining();
    c.read_pending = false;
    c.dirty = false;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.fd = fd;
    epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev);
    ++open_;
    stats_.connections_total.add();
    stats_.connections_open.value.store(open_, std::memory_order_relaxed);
  }
}

void Shard::close_conn(Conn& c) {
  if (c.closed) return;
  epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, c.fd, nullptr);
  ::close(c.fd);
  c.closed = true;
  c.in.clear();
  c.in.shrink_to_fit();
  c.out.clear();
  c.out.shrink_to_fit();
  --open_;
  stats_.connections_open.value.store(open_, std::memory_order_relaxed);
}

void Shard::on_readable(Conn& c, bool hangup) {
  char buf[16384];
  bool eof = false;
  c.read_pending = false;
  while (true) {
    // A client that sends but never reads is not read from until its answers drain. Edge
    // triggering will not report the bytes left in the socket again, so the connection is
    // marked to be read on once its output drains (see run()).
    if (c.out.size() - c.out_off > kMaxOutput) {
      c.read_pending = true;
      break;
    }
    ssize_t n = recv_raw(c.fd, buf, sizeof buf);
    if (n > 0) {
      c.sent_any = true;
      if (c.in.empty()) c.request_start_ns = batch_ns_;
      c.in.append(buf, static_cast<std::size_t>(n));
      c.last_active_ns = batch_ns_;
      // Bound the buffer: a head or body over the limits is refused by the parser long
      // before this, so only pipelined floods get here; process what we have first.
      if (c.in.size() >
          engine_.options().http.max_header_bytes + engine_.options().http.max_body_bytes + 16384) {
        process(c);
        if (c.closed) return;
        if (c.in.size() >
            engine_.options().http.max_header_bytes + engine_.options().http.max_body_bytes + 16384) {
          c.read_pending = true;
          break;
        }
      }
      // A short read drained the socket: with edge triggering, new data raises a new event,
      // so the read that would only say EAGAIN is skipped. After a hangup, read on to EOF.
      if (static_cast<std::size_t>(n) < sizeof buf && !hangup) break;
      continue;
    }
    if (n == 0) {
      eof = true;
      break;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) break;
    close_conn(c);
    return;
  }
  process(c);
  // The client finished sending: answer what was complete (at the end of this batch), then
  // close.
  if (eof && !c.closed) {
    c.close_after = true;
    mark_dirty(c);
  }
}

void Shard::respond_error(Conn& c, int code, ErrorReason reason) {
  stats_.errors[reason].add();
  char body[128];
  int n = std::snprintf(body, sizeof body, "{\"error\":\"%s\"}", error_reason_name(reason));
  append_response(c.out, code, "application/json", std::string_view(body, static_cast<std::size_t>(n)), true);
  c.close_after = true;
  c.in.clear();
}

void Shard::mark_dirty(Conn& c) {
  if (c.dirty) return;
  c.dirty = true;
  dirty_.push_back(c.fd);
}

void Shard::process(Conn& c) {
  const std::size_t out_before = c.out.size();
  std::size_t offset = 0;
  const http::Limits& limits = engine_.options().http;
  while (!c.close_after && offset < c.in.size() && c.out.size() - c.out_off <= kMaxOutput) {
    http::Request req;
    std::string_view view(c.in.data() + offset, c.in.size() - offset);
    http::Result r = http::parse(view, limits, req);
    if (r.status == http::Status::kIncomplete) break;
    if (r.status == http::Status::kError) {
      offset = 0;
      respond_error(c, r.code, reason_from_parser(r.reason));
      break;
    }
    std::uint64_t generation = 0;
    const Snapshot* snap = engine_.acquire(&generation);
    handle(c, req, snap);
    // Latency from the event batch that delivered the request: it includes the wait behind
    // the batch's earlier requests, as the client sees it, and costs one clock read.
    stats_.latency.record(static_cast<std::uint64_t>(mono_ns() - batch_ns_));
    offset += req.consumed;
    if (!req.keep_alive) c.close_after = true;
  }
  if (offset > 0 && !c.close_after)
    c.in.erase(0, offset);
  else if (c.close_after)
    c.in.clear();
  c.request_start_ns = c.in.empty() ? 0 : (c.request_start_ns ? c.request_start_ns : mono_ns());
  // Answers go out at the end of the event batch, after one spool write for the whole batch:
  // records reach the file before the answers that caused them reach the client.
  if (c.out.size() != out_before || c.close_after) mark_dirty(c);
}

void Shard::handle(Conn& c, const http::Request& req, const Snapshot* snap) {
  const bool draining = engine_.draining();
  const bool close = !req.keep_alive || draining;
  // The metrics address answers scrapes and health only; the serving addresses never show
  // the PoP's internals to the internet.
  if (req.path != "/healthz" && c.metrics_only != (req.path == "/metrics")) {
    stats_.requests[kRouteOther].add();
    return respond_error(c, 404, kErrNotFound);
  }
  if (req.path == "/healthz") {
    stats_.requests[kRouteHealthz].add();
    if (req.method != "GET" && req.method != "HEAD") return respond_error(c, 405, kErrMethod);
    if (draining)
      append_response(c.out, 503, "text/plain", "draining\n", close);
    else if (!snap)
      append_response(c.out, 503, "text/plain", "no snapshot\n", close);
    else
      append_response(c.out, 200, "text/plain", "ok\n", close);
    return;
  }
  if (req.path == "/metrics") {
    stats_.requests[kRouteMetrics].add();
    if (req.method != "GET") return respond_error(c, 405, kErrMethod);
    append_response(c.out, 200, "text/plain; version=0.0.4", engine_.metrics_text(), close);
    return;
  }
  if (req.path == "/v1/decide") {
    const bool post = req.method == "POST";
    stats_.requests[post ? kRouteDecidePost : kRouteDecideGet].add();
    if (!post && req.method != "GET") return respond_error(c, 405, kErrMethod);
    if (!snap) return respond_error(c, 503, kErrNoSnapshot);
    if (draining && c.accepted_draining) return respond_error(c, 503, kErrDraining);
    return handle_decide(c, req, *snap, close);
  }
  if (req.path == "/v1/e/imp" || req.path == "/v1/e/click") {
    const bool click = req.path == "/v1/e/click";
    stats_.requests[click ? kRouteClick : kRouteImpression].add();
    if (req.method != "GET") return respond_error(c, 405, kErrMethod);
    return handle_tracking(c, req, snap, click, close);
  }
  stats_.requests[kRouteOther].add();
  respond_error(c, 404, kErrNotFound);
}

void Shard::handle_decide(Conn& c, const http::Request& req, const Snapshot& snap, bool close) {
  const bool post = req.method == "POST";
  const char* error = "invalid request";
  bool ok;
  if (post) {
    // Parse in place: the body lives in this connection's input buffer.
    char* body = c.in.data() + (req.body.data() - c.in.data());
    ok = api::parse_json(body, req.body.size(), doc_, request_, &error);
  } else {
    ok = api::parse_query(req.query, scratch_, request_, &error);
  }
  if (!ok) {
    stats_.errors[post ? kErrBadJson : kErrBadField].add();
    std::string msg = "{\"error\":";
    api::append_json_string(msg, error);
    msg += "}";
    append_response(c.out, 400, "application/json", msg, close);
    return;
  }
  if (request_.explain) return respond_error(c, 403, kErrExplainForbidden);
  const std::int64_t now = batch_wall_ms_ / 1000;
  const DecideContext context{&engine_.signer(), engine_.options().budget_share, engine_.options().shards};
  decider_.decide(snap, request_, now, decision_, context);
  if (decision_.caps_rejected) stats_.caps_rejected.add();
  const auto campaigns = snap.campaigns();
  const auto ads = snap.ads();
  // One decision record per answer, written before the answer is sent.
  spool_->begin(EventType::kDecision, static_cast<std::uint64_t>(batch_wall_ms_));
  spool_->put_string(request_.id);
  spool_->put_string(request_.user_key);
  spool_->put_u32(static_cast<std::uint32_t>(snap.version()));
  spool_->put_u32(static_cast<std::uint32_t>(decision_.placements.size()));
  for (std::size_t i = 0; i < decision_.placements.size(); ++i) {
    const auto& pd = decision_.placements[i];
    if (pd.chosen.empty()) stats_.no_fill.add();
    spool_->put_string(request_.placements[i].id);
    spool_->put_u32(static_cast<std::uint32_t>(pd.chosen.size()));
    for (const auto& ch : pd.chosen) {
      spool_->put_string(snap.str(campaigns[ch.campaign].getId()));
      spool_->put_string(snap.str(ads[ch.ad].getId()));
    }
  }
  spool_->end();
  body_.clear();  // reused: no allocation per answer once warm
  api::TrackingLinks links{&engine_.signer(),
                           static_cast<std::uint32_t>(now) + engine_.options().token_ttl_s};
  api::render(snap, request_, decision_, body_, engine_.signer().usable() ? &links : nullptr, &fragments_);
  append_response(c.out, 200, "application/json", body_, close);
}

void Shard::handle_tracking(Conn& c, const http::Request& req, const Snapshot* snap, bool click, bool close) {
  TrackingToken token;
  const auto now = static_cast<std::uint32_t>(batch_wall_ms_ / 1000);
  std::string_view text = query_param(req.query, "t");
  TokenError err = engine_.signer().usable() ? engine_.signer().verify(text, now, token_scratch_, token)
                                             : TokenError::kForged;
  if (err == TokenError::kNone && (token.kind == TokenKind::kClick) != click) err = TokenError::kMalformed;
  if (err == TokenError::kMalformed) return respond_error(c, 403, kErrTokenMalformed);
  if (err == TokenError::kForged) return respond_error(c, 403, kErrTokenForged);
  if (err == TokenError::kExpired) return respond_error(c, 403, kErrTokenExpired);
  if (!click) {
    // One impression per request and ad: retries and double-fired pixels count once.
    std::uint64_t key = token.request_hash ^ (request_hash(token.ad) * 0x9E3779B97F4A7C15ULL);
    if (engine_.dedup().seen(key, now, engine_.options().dedup_window_s)) {
      stats_.impressions_duplicate.add();
    } else {
      stats_.impressions.add();
      spool_tracking(EventType::kImpression, token);
    }
    append_response(c.out, 204, "text/plain", "", close);
    return;
  }
  if (!snap) return respond_error(c, 503, kErrNoSnapshot);
  std::int64_t ad = find_ad(*snap, token.campaign, token.ad);
  if (ad < 0) return respond_error(c, 404, kErrUnknownAd);
  const auto creative = snap->creatives()[snap->ads()[static_cast<std::uint32_t>(ad)].getCreative()];
  const std::string_view landing = snap->str(creative.getLandingUrl());
  stats_.clicks.add();
  spool_tracking(EventType::kClick, token);
  char head[160];
  int n = std::snprintf(head, sizeof head, "HTTP/1.1 302 Found\r\nContent-Length: 0\r\n%sLocation: ",
                        close ? "Connection: close\r\n" : "");
  c.out.append(head, static_cast<std::size_t>(n));
  // The landing URL comes from a validated, signed snapshot; CR/LF cannot reach the header.
  for (char ch : landing)
    if (ch != '\r' && ch != '\n') c.out.push_back(ch);
  c.out += "\r\n\r\n";
}

// Impression and click records share one layout (engine/SPOOL.md).
void Shard::spool_tracking(EventType type, const TrackingToken& token) {
  spool_->begin(type, static_cast<std::uint64_t>(batch_wall_ms_));
  spool_->put_string(token.campaign);
  spool_->put_string(token.ad);
  spool_->put_string(token.placement);
  spool_->put_u32(static_cast<std::uint32_t>(token.request_hash));
  spool_->put_u32(static_cast<std::uint32_t>(token.request_hash >> 32));
  spool_->end();
}

void Shard::flush_spool(std::int64_t now_s) {
  spool_->flush(now_s);
  const SpoolStats& st = spool_->stats();
  stats_.spool_records.value.store(st.records, std::memory_order_relaxed);
  stats_.spool_write_errors.value.store(st.write_errors, std::memory_order_relaxed);
  stats_.spool_dropped.value.store(st.disabled_dropped, std::memory_order_relaxed);
  stats_.spool_segments_closed.value.store(st.segments_closed, std::memory_order_relaxed);
}

void Shard::flush(Conn& c) {
  while (c.out_off < c.out.size()) {
    ssize_t n = send_raw(c.fd, c.out.data() + c.out_off, c.out.size() - c.out_off);
    if (n > 0) {
      c.out_off += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    close_conn(c);
    return;
  }
  c.out.clear();
  c.out_off = 0;
  if (c.close_after) close_conn(c);
}

void Shard::tick(std::int64_t now) {
  const EngineOptions& o = engine_.options();
  flush_spool(engine_.now_seconds());  // rotates an idle shard's segment by age
  const std::int64_t idle = std::int64_t{o.idle_timeout_ms} * 1'000'000;
  const std::int64_t slow = std::int64_t{o.request_timeout_ms} * 1'000'000;
  const std::int64_t silent = std::int64_t{o.first_byte_timeout_ms} * 1'000'000;
  for (auto& p : conns_) {
    if (!p || p->closed) continue;
    Conn& c = *p;
    if (!c.sent_any && now - c.last_active_ns > silent) {
      // Connected and never spoke: a client has its request ready when it connects, so
      // this one is holding a slot, not asking (the idle timeout is for keep-alive).
      stats_.errors[kErrFirstByteTimeout].add();
      close_conn(c);
    } else if (c.request_start_ns && now - c.request_start_ns > slow) {
      // Slowloris: the request did not complete in time. Answer 408 and hang up.
      respond_error(c, 408, kErrTimeout);
      c.request_start_ns = 0;
      flush(c);
      if (!c.closed) close_conn(c);
    } else if (c.in.empty() && c.out.size() == c.out_off && now - c.last_active_ns > idle) {
      close_conn(c);
    } else if (engine_.draining() && c.in.empty() && c.out.size() == c.out_off &&
               now - c.last_active_ns > 1'000'000'000) {
      // Draining: idle keep-alive connections are closed so clients move elsewhere. A second
      // of grace: a connection just opened (a balancer's health check) gets to send first.
      close_conn(c);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Engine

Engine::Engine(EngineOptions options) : options_(std::move(options)), signer_(options_.token_key), dedup_() {}

DedupTable::DedupTable(std::size_t slots_pow2) : slots_(new Slot[slots_pow2]), mask_(slots_pow2 - 1) {}

bool DedupTable::seen(std::uint64_t key, std::uint32_t now, std::uint32_t window) {
  if (key == 0) key = 1;  // 0 marks an empty slot
  const std::size_t start = static_cast<std::size_t>(key * 0x9E3779B97F4A7C15ULL >> 20) & mask_;
  for (std::size_t probe = 0; probe < 8; ++probe) {
    Slot& s = slots_[(start + probe) & mask_];
    std::uint64_t k = s.key.load(std::memory_order_acquire);
    if (k == key) {
      std::uint32_t t = s.time.load(std::memory_order_relaxed);
      if (now - t < window) return true;
      s.time.store(now, std::memory_order_relaxed);
      return false;
    }
    const bool expired = k != 0 && now - s.time.load(std::memory_order_relaxed) >= window;
    if (k == 0 || expired) {
      if (s.key.compare_exchange_strong(k, key, std::memory_order_acq_rel)) {
        s.time.store(now, std::memory_order_relaxed);
        return false;
      }
      if (k == key) return true;  // another shard recorded the same impression just now
    }
  }
  // Every probed slot holds a live entry: overwrite the first (the table is sized so this
  // is rare; an early overwrite can only miss a duplicate, never invent one).
  Slot& s = slots_[start];
  s.key.store(key, std::memory_order_release);
  s.time.store(now, std::memory_order_relaxed);
  return false;
}

Engine::~Engine() {
  stopping_.store(true);
  for (auto& s : shards_) s->join();
  if (admin_thread_.joinable()) admin_thread_.join();
  if (admin_fd_ >= 0) ::close(admin_fd_);
  if (!options_.admin_path.empty()) ::unlink(options_.admin_path.c_str());
  delete current_.load();
}

std::int64_t Engine::now_seconds() const {
  return static_cast<std::int64_t>(std::time(nullptr));
}

bool Engine::load(std::string* error) {
  std::lock_guard<std::mutex> lock(swap_mutex_);
  const std::int64_t started = mono_ns();
  char resolved[PATH_MAX];
  if (!realpath(options_.snapshot_dir.c_str(), resolved)) {
    ++loads_failed_;
    *error = "snapshot folder " + options_.snapshot_dir + ": " + std::strerror(errno);
    last_load_error_ = *error;
    return false;
  }
  const std::string path = std::string(resolved) + "/payload.capnp";
  auto snap = Snapshot::open(path, options_.hugepages, error);
  if (!snap) {
    ++loads_failed_;
    last_load_error_ = *error;
    return false;
  }
  // Older versions are loaded too: a rollback re-points `current` at one on purpose. The
  // sync verified every stored version (hash, signature) before it could become current.
  // The hash is recomputed here for status and reports, over the bytes actually mapped.
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int digest_len = 0;
  {
    std::ifstream in(path, std::ios::binary);
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
    char buf[1 << 16];
    while (in.read(buf, sizeof buf) || in.gcount() > 0)
      EVP_DigestUpdate(ctx, buf, static_cast<std::size_t>(in.gcount()));
    EVP_DigestFinal_ex(ctx, digest, &digest_len);
    EVP_MD_CTX_free(ctx);
  }
  char hex[2 * EVP_MAX_MD_SIZE + 1] = {};
  for (unsigned i = 0; i < digest_len; ++i) std::snprintf(hex + 2 * i, 3, "%02x", digest[i]);
  Snapshot* next = snap.release();
  const Snapshot* old = current_.exchange(next, std::memory_order_acq_rel);
  const std::uint64_t generation = generation_.fetch_add(1, std::memory_order_acq_rel) + 1;
  if (old) retired_.emplace_back(std::unique_ptr<Snapshot>(const_cast<Snapshot*>(old)), generation);
  hash_ = hex;
  loaded_path_ = resolved;
  last_load_ms_ = static_cast<double>(mono_ns() - started) / 1e6;
  ++loads_ok_;
  last_load_error_.clear();
  return true;
}

void Engine::reclaim() {
  std::lock_guard<std::mutex> lock(swap_mutex_);
  if (retired_.empty()) return;
  std::uint64_t oldest_seen = UINT64_MAX;
  for (auto& s : shards_)
    oldest_seen = std::min(oldest_seen, s->stats().seen_generation.load(std::memory_order_acquire));
  // A snapshot retired at generation G may still be in use by a shard that has not yet
  // published G; once every shard has, none can reach it and its mapping is released.
  retired_.erase(std::remove_if(retired_.begin(), retired_.end(),
                                [&](const auto& r) { return oldest_seen >= r.second; }),
                 retired_.end());
}

bool Engine::start(std::string* error) {
  started_ns_ = mono_ns();
  rate_ns_ = started_ns_;
  if (!load(error)) return false;
  if (!options_.admin_path.empty()) {
    ::unlink(options_.admin_path.c_str());
    admin_fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (options_.admin_path.size() >= sizeof addr.sun_path) {
      *error = "--admin: path too long for a Unix socket";
      return false;
    }
    std::strcpy(addr.sun_path, options_.admin_path.c_str());
    if (bind(admin_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || listen(admin_fd_, 64) != 0) {
      *error = "admin socket " + options_.admin_path + ": " + std::strerror(errno);
      return false;
    }
    chmod(options_.admin_path.c_str(), 0660);
  }
  const int ncpu = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  for (std::uint32_t i = 0; i < options_.shards; ++i) {
    int cpu = options_.cpus.empty() ? -1 : options_.cpus[i % options_.cpus.size()];
    if (cpu >= ncpu) {
      *error = "--cpus: CPU " + std::to_string(cpu) + " does not exist (this machine has " +
               std::to_string(ncpu) + ")";
      return false;
    }
    shards_.push_back(std::make_unique<Shard>(*this, i, cpu));
    if (!shards_.back()->start(error)) return false;
  }
  admin_thread_ = std::thread([this] { admin_loop(); });
  return true;
}

void Engine::wait() {
  for (auto& s : shards_) s->join();
  if (admin_thread_.joinable()) admin_thread_.join();
}

void Engine::admin_loop() {
  pthread_setname_np(pthread_self(), "admin");
  while (!stopping_.load()) {
    if (reload_requested_.exchange(false)) {
      std::string error;
      if (!load(&error))
        std::fprintf(stderr, "adpop-engine: reload refused: %s\n", error.c_str());
      else
        std::fprintf(stderr, "adpop-engine: now serving snapshot version %llu\n",
                     static_cast<unsigned long long>(current_.load()->version()));
    }
    reclaim();
    if (admin_fd_ < 0) {
      usleep(100000);
      continue;
    }
    pollfd pfd{admin_fd_, POLLIN, 0};
    if (poll(&pfd, 1, 100) <= 0) continue;
    int fd = accept4(admin_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    timeval tv{2, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    handle_admin(fd);
    ::close(fd);
  }
}

void Engine::handle_admin(int fd) {
  std::string in;
  char buf[8192];
  http::Request req;
  http::Limits limits;
  limits.max_body_bytes = 1 << 20;
  http::Result r;
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) return;
    in.append(buf, static_cast<std::size_t>(n));
    r = http::parse(in, limits, req);
    if (r.status != http::Status::kIncomplete) break;
  }
  std::string out;
  auto reply = [&](int code, const std::string& body) {
    append_response(out, code, "application/json", body, true);
    std::size_t off = 0;
    while (off < out.size()) {
      ssize_t n = ::send(fd, out.data() + off, out.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return;
      off += static_cast<std::size_t>(n);
    }
  };
  auto error_json = [](const std::string& code, const std::string& message) {
    std::string s = "{\"error\":";
    api::append_json_string(s, code);
    s += ",\"message\":";
    api::append_json_string(s, message);
    return s + "}";
  };
  if (r.status == http::Status::kError) return reply(r.code, error_json(r.reason, "malformed request"));
  if (req.path == "/status" && req.method == "GET") return reply(200, status_json());
  if (req.path == "/load" && req.method == "POST") {
    std::string error;
    if (!load(&error)) return reply(409, error_json("load_refused", error));
    return reply(200, status_json());
  }
  if (req.path == "/drain" && req.method == "POST") {
    drain(true);
    return reply(200, status_json());
  }
  if (req.path == "/undrain" && req.method == "POST") {
    drain(false);
    return reply(200, status_json());
  }
  if (req.path == "/decide" && req.method == "POST") {
    // The admin door for `explain`: the same decision the serving port would make.
    const Snapshot* snap = current_.load();
    std::string body(req.body);
    json::Document doc;
    DecideRequest request;
    const char* error = "invalid request";
    if (!api::parse_json(body.data(), body.size(), doc, request, &error))
      return reply(400, error_json("bad_json", error));
    // Only this (admin) thread swaps and frees snapshots, so `snap` stays valid here.
    Decider decider;
    Decision decision;
    DecideContext context{&signer_, options_.budget_share, options_.shards};
    decider.decide(*snap, request, now_seconds(), decision, context);
    std::string answer;
    api::render(*snap, request, decision, answer);
    return reply(200, answer);
  }
  reply(404, error_json("not_found", "routes: GET /status, POST /load /drain /undrain /decide"));
}

Engine::Totals Engine::collect() const {
  Totals t;
  for (const auto& shard : shards_) {
    const ShardStats& st = shard->stats();
    for (int r = 0; r < kRoutes; ++r) t.routes[r] += st.requests[r].get();
    for (int e = 0; e < kErrReasons; ++e) t.errors[e] += st.errors[e].get();
    for (int b = 0; b < LatencyHistogram::kBuckets; ++b) t.hist[b] += st.latency.buckets[b].get();
    t.latency_sum_ns += st.latency.sum_ns.get();
    t.no_fill += st.no_fill.get();
    t.connections += st.connections_open.get();
    t.connections_total += st.connections_total.get();
    t.impressions += st.impressions.get();
    t.duplicates += st.impressions_duplicate.get();
    t.clicks += st.clicks.get();
    t.caps_rejected += st.caps_rejected.get();
    t.records += st.spool_records.get();
    t.write_errors += st.spool_write_errors.get();
    t.dropped += st.spool_dropped.get();
    t.closed += st.spool_segments_closed.get();
    t.idle_poll_ns += st.idle_poll_ns.get();
    t.polling += st.polling.get();
  }
  for (auto r : t.routes) t.requests += r;
  return t;
}

std::string Engine::status_json() {
  const Totals totals = collect();
  const auto& hist = totals.hist;
  const auto& errors = totals.errors;
  const std::uint64_t requests = totals.requests, no_fill = totals.no_fill, connections = totals.connections;
  const std::uint64_t impressions = totals.impressions, duplicates = totals.duplicates,
                      clicks = totals.clicks, records = totals.records, write_errors = totals.write_errors,
                      dropped = totals.dropped, closed = totals.closed, caps_rejected = totals.caps_rejected;
  std::uint64_t total = 0;
  for (auto h : hist) total += h;
  auto quantile = [&](double q) -> double {
    if (total == 0) return 0;
    std::uint64_t rank = static_cast<std::uint64_t>(q * static_cast<double>(total - 1)) + 1, seen = 0;
    for (int b = 0; b < LatencyHistogram::kBuckets; ++b) {
      seen += hist[b];
      if (seen >= rank) return static_cast<double>(LatencyHistogram::upper_ns(b)) / 1000.0;
    }
    return 0;
  };
  const std::int64_t now = mono_ns();
  double rps = 0;
  if (now > rate_ns_)
    rps = static_cast<double>(requests - rate_total_) * 1e9 / static_cast<double>(now - rate_ns_);
  rate_total_ = requests;
  rate_ns_ = now;
  const Snapshot* snap = current_.load();
  std::string s = "{";
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "\"version\":%llu,\"hash\":\"%s\",\"snapshot_bytes\":%zu,\"hugepages\":%s,"
                "\"campaigns\":%u,\"shards\":%zu,\"draining\":%s,\"uptime_s\":%.1f,"
                "\"requests\":%llu,\"requests_per_second\":%.1f,\"no_fill\":%llu,"
                "\"connections\":%llu,\"latency_us\":{\"p50\":%.2f,\"p99\":%.2f,\"p999\":%.2f},",
                static_cast<unsigned long long>(snap ? snap->version() : 0), hash_.c_str(),
                snap ? snap->bytes() : 0, snap && snap->on_hugepages() ? "true" : "false",
                snap ? snap->campaigns().size() : 0u, shards_.size(), draining() ? "true" : "false",
                static_cast<double>(now - started_ns_) / 1e9, static_cast<unsigned long long>(requests), rps,
                static_cast<unsigned long long>(no_fill), static_cast<unsigned long long>(connections),
                quantile(0.5), quantile(0.99), quantile(0.999));
  s += buf;
  std::snprintf(buf, sizeof buf,
                "\"events\":{\"impressions\":%llu,\"impressions_duplicate\":%llu,\"clicks\":%llu,"
                "\"cap_tokens_rejected\":%llu},"
                "\"spool\":{\"enabled\":%s,\"records\":%llu,\"write_errors\":%llu,\"dropped\":%llu,"
                "\"segments_closed\":%llu},",
                static_cast<unsigned long long>(impressions), static_cast<unsigned long long>(duplicates),
                static_cast<unsigned long long>(clicks), static_cast<unsigned long long>(caps_rejected),
                options_.spool_dir.empty() ? "false" : "true", static_cast<unsigned long long>(records),
                static_cast<unsigned long long>(write_errors), static_cast<unsigned long long>(dropped),
                static_cast<unsigned long long>(closed));
  s += buf;
  s += "\"errors\":{";
  for (int e = 0; e < kErrReasons; ++e) {
    std::snprintf(buf, sizeof buf, "%s\"%s\":%llu", e ? "," : "",
                  error_reason_name(static_cast<ErrorReason>(e)), static_cast<unsigned long long>(errors[e]));
    s += buf;
  }
  std::snprintf(buf, sizeof buf,
                "},\"loads\":{\"ok\":%llu,\"failed\":%llu,\"retired_pending\":%zu,\"last_ms\":%.1f,"
                "\"last_error\":",
                static_cast<unsigned long long>(loads_ok_), static_cast<unsigned long long>(loads_failed_),
                retired_.size(), last_load_ms_);
  s += buf;
  api::append_json_string(s, last_load_error_);
  s += ",\"path\":";
  api::append_json_string(s, loaded_path_);
  s += "}}";
  return s;
}

std::string Engine::metrics_text() {
  std::string s;
  char buf[2048];
  const Totals totals = collect();
  const auto& routes = totals.routes;
  const auto& errors = totals.errors;
  const auto& hist = totals.hist;
  const std::uint64_t no_fill = totals.no_fill, connections = totals.connections,
                      connections_total = totals.connections_total, impressions = totals.impressions,
                      duplicates = totals.duplicates, clicks = totals.clicks, records = totals.records,
                      write_errors = totals.write_errors, dropped = totals.dropped;
  s += "# HELP adpop_requests_total Requests by route.\n# TYPE adpop_requests_total counter\n";
  for (int r = 0; r < kRoutes; ++r) {
    std::snprintf(buf, sizeof buf, "adpop_requests_total{route=\"%s\"} %llu\n", kRouteNames[r],
                  static_cast<unsigned long long>(routes[r]));
    s += buf;
  }
  s += "# HELP adpop_errors_total Refused or failed requests by reason.\n# TYPE adpop_errors_total counter\n";
  for (int e = 0; e < kErrReasons; ++e) {
    std::snprintf(buf, sizeof buf, "adpop_errors_total{reason=\"%s\"} %llu\n",
                  error_reason_name(static_cast<ErrorReason>(e)), static_cast<unsigned long long>(errors[e]));
    s += buf;
  }
  std::snprintf(
      buf, sizeof buf,
      "# HELP adpop_no_fill_total Placements answered without an ad.\n# TYPE adpop_no_fill_total counter\n"
      "adpop_no_fill_total %llu\n",
      static_cast<unsigned long long>(no_fill));
  s += buf;
  std::snprintf(
      buf, sizeof buf,
      "# HELP adpop_events_total Tracking events by kind.\n# TYPE adpop_events_total counter\n"
      "adpop_events_total{kind=\"impression\"} %llu\nadpop_events_total{kind=\"impression_duplicate\"} %llu\n"
      "adpop_events_total{kind=\"click\"} %llu\n"
      "# HELP adpop_spool_records_total Event records by outcome.\n# TYPE adpop_spool_records_total counter\n"
      "adpop_spool_records_total{outcome=\"framed\"} "
      "%llu\nadpop_spool_records_total{outcome=\"write_error\"} %llu\n"
      "adpop_spool_records_total{outcome=\"no_spool\"} %llu\n",
      static_cast<unsigned long long>(impressions), static_cast<unsigned long long>(duplicates),
      static_cast<unsigned long long>(clicks), static_cast<unsigned long long>(records),
      static_cast<unsigned long long>(write_errors), static_cast<unsigned long long>(dropped));
  s += buf;
  s += "# HELP adpop_request_duration_seconds Time from parsed request to queued answer.\n"
       "# TYPE adpop_request_duration_seconds histogram\n";
  static const double kBounds[] = {1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4,
                                   2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2};
  std::uint64_t count = 0;
  int b = 0;
  for (double bound : kBounds) {
    while (b < LatencyHistogram::kBuckets &&
           static_cast<double>(LatencyHistogram::upper_ns(b)) <= bound * 1e9)
      count += hist[b++];
    std::snprintf(buf, sizeof buf, "adpop_request_duration_seconds_bucket{le=\"%g\"} %llu\n", bound,
                  static_cast<unsigned long long>(count));
    s += buf;
  }
  while (b < LatencyHistogram::kBuckets) count += hist[b++];
  std::snprintf(
      buf, sizeof buf,
      "adpop_request_duration_seconds_bucket{le=\"+Inf\"} %llu\nadpop_request_duration_seconds_sum %.9f\n"
      "adpop_request_duration_seconds_count %llu\n",
      static_cast<unsigned long long>(count), static_cast<double>(totals.latency_sum_ns) / 1e9,
      static_cast<unsigned long long>(count));
  s += buf;
  const Snapshot* snap = current_.load(std::memory_order_acquire);
  std::snprintf(
      buf, sizeof buf,
      "# HELP adpop_snapshot_version Active snapshot version.\n# TYPE adpop_snapshot_version gauge\n"
      "adpop_snapshot_version %llu\n"
      "# HELP adpop_connections Open client connections.\n# TYPE adpop_connections gauge\n"
      "adpop_connections %llu\n"
      "# HELP adpop_connections_total Accepted client connections.\n# TYPE adpop_connections_total counter\n"
      "adpop_connections_total %llu\n"
      "# HELP adpop_draining 1 while draining.\n# TYPE adpop_draining gauge\nadpop_draining %d\n"
      "# HELP adpop_idle_poll_seconds_total Shard time spent polling with nothing to do.\n"
      "# TYPE adpop_idle_poll_seconds_total counter\nadpop_idle_poll_seconds_total %.6f\n"
      "# HELP adpop_shards_polling Shards busy enough to poll after their last event.\n"
      "# TYPE adpop_shards_polling gauge\nadpop_shards_polling %llu\n",
      static_cast<unsigned long long>(snap ? snap->version() : 0),
      static_cast<unsigned long long>(connections), static_cast<unsigned long long>(connections_total),
      draining() ? 1 : 0, static_cast<double>(totals.idle_poll_ns) / 1e9,
      static_cast<unsigned long long>(totals.polling));
  s += buf;
  return s;
}

}  // namespace adpop
