// Sockets: listening addresses, listeners, and the shards' raw recv and send.
#pragma once

#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <string>
#include <string_view>

namespace adpop {

// A listening address: IPv4, or IPv6 in brackets; "[::]" listens on both families.
struct Endpoint {
  std::string host;
  std::uint16_t port = 0;
  std::string text() const;  // 127.0.0.1:8080 or [::1]:8080
};
// "HOST:PORT" or "[V6]:PORT" into `out`; false, with `error` naming the problem, else.
bool parse_endpoint(std::string_view text, Endpoint* out, std::string* error);

// A non-blocking listening socket on `ep`, or -1 with `error` set.
int open_listener(const Endpoint& ep, bool reuseport, int rcvbuf, std::string* error);
// Adds a listener to an epoll set, level-triggered for reads.
void watch_listener(int epoll_fd, int fd);

// Shard threads are never cancelled, so they call recv and send through syscall(2): glibc's
// recv and send are cancellation points that toggle the thread's cancel state on every call,
// a measurable share of a request's user time.
inline ssize_t recv_raw(int fd, void* buf, std::size_t len) {
  return syscall(SYS_recvfrom, fd, buf, len, 0, nullptr, nullptr);
}
inline ssize_t send_raw(int fd, const void* buf, std::size_t len) {
  return syscall(SYS_sendto, fd, buf, len, MSG_NOSIGNAL, nullptr, 0);
}

}  // namespace adpop
