// The admin socket (a Unix socket, one request per connection, served by the admin thread):
// status, load, drain and undrain, and the `explain` decision.
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <string>

#include "api.hpp"
#include "response.hpp"
#include "server.hpp"

namespace adpop {

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
    watch_spool();
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

}  // namespace adpop
