// Fixed-rate HTTP load generator (open loop), for latency at a chosen request rate.
//
// Requests are scheduled at exact intervals; latency is measured from each request's
// scheduled time, so a stalled server shows up as queueing delay instead of silently lowering
// the offered rate (no coordinated omission). One thread, epoll, keep-alive connections, one
// request in flight per connection.
//
// usage: adpop-loadgen HOST PORT PATH RATE SECONDS CONNECTIONS
// PATH is one request path, or @FILE: one path per line, sent in turn (the request mix the
// throughput rounds use, so "half the maximum" means half of the same work).
// prints one JSON line: sent, ok, errors, achieved rps, p50/p99/p99.9 in microseconds, and
// what this process itself lost: p99 of the time a request waited past its scheduled time
// before it was sent (send_late_p99_us), and the main loop's stalls (client_stalls: passes
// that took over 250 us beyond the wait they asked for, client_stalled_ms in all). A
// stall of the client's CPU delays every request scheduled in it, whatever the server.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <deque>
#include <fstream>
#include <string>
#include <vector>

namespace {

std::int64_t now_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

struct Conn {
  int fd = -1;
  bool busy = false;
  std::int64_t scheduled = 0;
  std::string in;
};

int connect_to(const sockaddr_in& addr) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    return -1;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  return fd;
}

// Length of one complete response at the start of `s`, or 0 if incomplete.
std::size_t response_length(const std::string& s) {
  std::size_t head = s.find("\r\n\r\n");
  if (head == std::string::npos) return 0;
  std::size_t length = 0;
  std::size_t at = s.find("Content-Length:");
  if (at == std::string::npos || at > head) at = s.find("content-length:");
  if (at != std::string::npos && at < head) length = std::strtoul(s.c_str() + at + 15, nullptr, 10);
  return s.size() >= head + 4 + length ? head + 4 + length : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: adpop-loadgen HOST PORT PATH RATE SECONDS CONNECTIONS\n");
    return 2;
  }
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(std::atoi(argv[2])));
  if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
    std::fprintf(stderr, "adpop-loadgen: bad host %s\n", argv[1]);
    return 2;
  }
  std::vector<std::string> requests;
  auto add_request = [&](const std::string& path) {
    requests.push_back("GET " + path + " HTTP/1.1\r\nHost: bench\r\n\r\n");
  };
  if (argv[3][0] == '@') {
    std::ifstream paths(argv[3] + 1);
    for (std::string line; std::getline(paths, line);)
      if (!line.empty()) add_request(line);
    if (requests.empty()) {
      std::fprintf(stderr, "adpop-loadgen: %s holds no request paths\n", argv[3] + 1);
      return 2;
    }
  } else {
    add_request(argv[3]);
  }
  const double rate = std::atof(argv[4]);
  const double seconds = std::atof(argv[5]);
  const int connections = std::atoi(argv[6]);
  if (rate <= 0 || seconds <= 0 || connections <= 0) {
    std::fprintf(stderr, "adpop-loadgen: RATE, SECONDS and CONNECTIONS must be positive\n");
    return 2;
  }
  int ep = epoll_create1(EPOLL_CLOEXEC);
  std::vector<Conn> conns(static_cast<std::size_t>(connections));
  for (std::size_t i = 0; i < conns.size(); ++i) {
    conns[i].fd = connect_to(addr);
    if (conns[i].fd < 0) {
      std::fprintf(stderr, "adpop-loadgen: cannot connect: %s\n", std::strerror(errno));
      return 1;
    }
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = i;
    epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
  }
  const std::int64_t interval = static_cast<std::int64_t>(1e9 / rate);
  const std::int64_t start = now_ns() + 10'000'000;
  const std::int64_t total = static_cast<std::int64_t>(rate * seconds);
  std::int64_t next_index = 0;
  std::deque<std::int64_t> backlog;  // scheduled times waiting for a free connection
  std::vector<std::int64_t> latencies, send_late;
  latencies.reserve(static_cast<std::size_t>(total));
  send_late.reserve(static_cast<std::size_t>(total));
  // A pass of the loop is a few sends and receives (tens of microseconds); one that takes far
  // longer than its epoll wait asked for means this thread was not running.
  constexpr std::int64_t kStallNs = 250'000;
  std::int64_t stalls = 0, stalled_ns = 0, pass_start = now_ns(), asked_ns = 0;
  std::int64_t ok = 0, errors = 0, sent = 0;
  std::vector<std::size_t> idle;
  for (std::size_t i = 0; i < conns.size(); ++i) idle.push_back(i);
  epoll_event events[256];
  const std::int64_t hard_stop = start + static_cast<std::int64_t>((seconds + 10) * 1e9);
  while ((next_index < total || !backlog.empty() ||
          std::any_of(conns.begin(), conns.end(), [](const Conn& c) { return c.busy; })) &&
         now_ns() < hard_stop) {
    const std::int64_t t = now_ns();
    if (t - pass_start - asked_ns > kStallNs) {
      ++stalls;
      stalled_ns += t - pass_start - asked_ns;
    }
    pass_start = t;
    while (next_index < total && start + next_index * interval <= t)
      backlog.push_back(start + interval * next_index++);
    while (!backlog.empty() && !idle.empty()) {
      Conn& c = conns[idle.back()];
      idle.pop_back();
      c.busy = true;
      c.scheduled = backlog.front();
      backlog.pop_front();
      send_late.push_back(now_ns() - c.scheduled);
      const std::string& request = requests[static_cast<std::size_t>(sent++) % requests.size()];
      if (send(c.fd, request.data(), request.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(request.size())) {
        ++errors;
        c.busy = false;
      }
    }
    std::int64_t wait_ns = next_index < total ? start + next_index * interval - now_ns() : 1'000'000;
    int timeout_ms = wait_ns > 1'000'000 ? static_cast<int>(wait_ns / 1'000'000) : 0;
    asked_ns = std::int64_t{timeout_ms} * 1'000'000;
    int n = epoll_wait(ep, events, 256, timeout_ms);
    for (int i = 0; i < n; ++i) {
      std::size_t idx = events[i].data.u64;
      Conn& c = conns[idx];
      char buf[65536];
      while (true) {
        ssize_t r = recv(c.fd, buf, sizeof buf, 0);
        if (r > 0) {
          c.in.append(buf, static_cast<std::size_t>(r));
          continue;
        }
        if (r == 0) {
          ++errors;  // the server closed a keep-alive connection: reconnect
          epoll_ctl(ep, EPOLL_CTL_DEL, c.fd, nullptr);
          close(c.fd);
          c.fd = connect_to(addr);
          epoll_event ev{};
          ev.events = EPOLLIN;
          ev.data.u64 = idx;
          if (c.fd >= 0) epoll_ctl(ep, EPOLL_CTL_ADD, c.fd, &ev);
          c.busy = false;
          c.in.clear();
          idle.push_back(idx);
        }
        break;
      }
      std::size_t len = 0;
      while (c.busy && (len = response_length(c.in)) > 0) {
        const bool good = c.in.compare(0, 12, "HTTP/1.1 200") == 0;
        c.in.erase(0, len);
        if (good)
          ++ok;
        else
          ++errors;
        latencies.push_back(now_ns() - c.scheduled);
        c.busy = false;
        idle.push_back(idx);
      }
    }
  }
  std::sort(latencies.begin(), latencies.end());
  std::sort(send_late.begin(), send_late.end());
  auto q = [](const std::vector<std::int64_t>& sorted, double p) -> double {
    if (sorted.empty()) return 0;
    std::size_t i = static_cast<std::size_t>(p * static_cast<double>(sorted.size() - 1));
    return static_cast<double>(sorted[i]) / 1000.0;
  };
  const double elapsed = static_cast<double>(now_ns() - start) / 1e9;
  std::printf(
      "{\"sent\":%lld,\"ok\":%lld,\"errors\":%lld,\"achieved_rps\":%.1f,\"p50_us\":%.1f,"
      "\"p99_us\":%.1f,\"p999_us\":%.1f,\"send_late_p99_us\":%.1f,\"client_stalls\":%lld,"
      "\"client_stalled_ms\":%.1f}\n",
      static_cast<long long>(next_index), static_cast<long long>(ok), static_cast<long long>(errors),
      static_cast<double>(ok) / elapsed, q(latencies, 0.5), q(latencies, 0.99), q(latencies, 0.999),
      q(send_late, 0.99), static_cast<long long>(stalls), static_cast<double>(stalled_ns) / 1e6);
  return 0;
}
