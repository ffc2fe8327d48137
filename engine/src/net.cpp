#include "net.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>

#include <cerrno>
#include <charconv>
#include <cstring>

namespace adpop {

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

}  // namespace adpop
