// The admin socket (a Unix socket, one request per connection, served by the admin thread):
// status, load, drain and undrain, and the `explain` decision.
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <unordered_map>

#include "api.hpp"
#include "clock.hpp"
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
  limits.max_body_bytes = 8 << 20;  // allowances for up to --pacing-campaigns campaigns
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
    // An observer: paces with every shard's figures and publishes none of its own.
    ShardPacer observer(pacing_, ShardPacer::kObserver);
    const auto wall = static_cast<std::int64_t>(wall_ms());
    observer.tick(wall);
    DecideContext context{&signer_, &observer, wall};
    decider.decide(*snap, request, now_seconds(), decision, context);
    std::string answer;
    api::render(*snap, request, decision, answer);
    return reply(200, answer);
  }
  if (req.path == "/allowances" && req.method == "POST") {
    std::string error;
    if (!install_allowances(req.body, &error)) return reply(409, error_json("allowances_refused", error));
    return reply(200, pacing_json());
  }
  if (req.path == "/pacing" && req.method == "GET") return reply(200, pacing_json());
  reply(404, error_json("not_found",
                        "routes: GET /status /pacing, POST /load /drain /undrain /decide /allowances"));
}

// The allowance set the supervisor sends (already verified against the origin's signature):
//   {"seq":N,"issued_ms":T,"interval_end_ms":T,"expires_ms":T,"day":D,
//    "campaigns":[{"id":"...","cap_micros":N,"origin_spent_micros":N},...]}
bool Engine::install_allowances(std::string_view body, std::string* error) {
  std::string text(body);
  json::Document doc;
  json::Limits limits;
  limits.max_values = 8 * options_.pacing_campaigns + 64;
  const char* why = nullptr;
  if (!doc.parse(text.data(), text.size(), limits, &why)) {
    *error = std::string("allowances: ") + why;
    return false;
  }
  const json::Value& root = doc.root();
  auto integer = [&](const json::Value& object, std::string_view name, double lo, double* out) {
    const json::Value* v = doc.member(object, name);
    if (!v || v->type != json::Type::kNumber || v->number < lo || v->number > 9.0e15 ||
        v->number != static_cast<double>(static_cast<std::int64_t>(v->number))) {
      *error = "allowances: \"" + std::string(name) + "\" must be a whole number";
      return false;
    }
    *out = v->number;
    return true;
  };
  if (root.type != json::Type::kObject) {
    *error = "allowances: expected a JSON object";
    return false;
  }
  double seq, issued, end, expires, day;
  if (!integer(root, "seq", 1, &seq) || !integer(root, "issued_ms", 0, &issued) ||
      !integer(root, "interval_end_ms", 0, &end) || !integer(root, "expires_ms", 0, &expires) ||
      !integer(root, "day", 0, &day))
    return false;
  const json::Value* list = doc.member(root, "campaigns");
  if (!list || list->type != json::Type::kArray) {
    *error = "allowances: \"campaigns\" must be a list";
    return false;
  }
  AllowanceSet set;
  set.seq = static_cast<std::uint64_t>(seq);
  set.issued_ms = static_cast<std::int64_t>(issued);
  set.interval_end_ms = static_cast<std::int64_t>(end);
  set.expires_ms = static_cast<std::int64_t>(expires);
  set.day = static_cast<std::int64_t>(day);
  bool ok = true;
  doc.each(*list, [&](const json::Value& item) {
    if (!ok) return;
    const json::Value* id = item.type == json::Type::kObject ? doc.member(item, "id") : nullptr;
    if (!id || id->type != json::Type::kString || id->text.empty()) {
      *error = "allowances: each campaign needs an \"id\"";
      ok = false;
      return;
    }
    double cap, spent;
    if (!integer(item, "cap_micros", 0, &cap) || !integer(item, "origin_spent_micros", 0, &spent)) {
      ok = false;
      return;
    }
    set.campaigns.push_back({crc32_ieee(id->text.data(), id->text.size()), static_cast<std::uint64_t>(cap),
                             static_cast<std::uint64_t>(spent), 0});
  });
  if (!ok) return false;
  std::sort(set.campaigns.begin(), set.campaigns.end(),
            [](const CampaignAllowance& a, const CampaignAllowance& b) { return a.id_hash < b.id_hash; });
  return pacing_.install(std::move(set), error);
}

// Per budgeted campaign: the allowance and what the shards have published against it.
std::string Engine::pacing_json() {
  auto set = pacing_.current();
  std::string s = "{";
  char buf[256];
  if (!set) return s + "\"seq\":0,\"campaigns\":[]}";
  const auto now = static_cast<std::int64_t>(wall_ms());
  std::snprintf(buf, sizeof buf,
                "\"seq\":%llu,\"issued_ms\":%lld,\"interval_end_ms\":%lld,\"expires_ms\":%lld,\"day\":%lld,"
                "\"expired\":%s,\"campaigns\":[",
                static_cast<unsigned long long>(set->seq), static_cast<long long>(set->issued_ms),
                static_cast<long long>(set->interval_end_ms), static_cast<long long>(set->expires_ms),
                static_cast<long long>(set->day), now >= set->expires_ms ? "true" : "false");
  s += buf;
  // Names come from the serving snapshot; a campaign it no longer has shows its hash.
  std::unordered_map<std::uint32_t, std::string_view> names;
  if (const Snapshot* snap = current_.load())
    for (auto camp : snap->campaigns()) names.emplace(camp.getIdHash(), snap->str(camp.getId()));
  bool first = true;
  for (const PaceFigures& f : pacing_.figures()) {
    if (!first) s.push_back(',');
    first = false;
    s += "{\"id\":";
    auto it = names.find(f.id_hash);
    api::append_json_string(s, it != names.end() ? std::string(it->second) : "#" + std::to_string(f.id_hash));
    std::snprintf(buf, sizeof buf,
                  ",\"cap_micros\":%llu,\"spent_micros\":%llu,\"reserved_micros\":%llu,\"eligible\":%llu,"
                  "\"throttled\":%llu,\"pass_rate\":%.4f}",
                  static_cast<unsigned long long>(f.cap), static_cast<unsigned long long>(f.spent),
                  static_cast<unsigned long long>(f.reserved), static_cast<unsigned long long>(f.eligible),
                  static_cast<unsigned long long>(f.throttled), f.pass_rate);
    s += buf;
  }
  return s + "]}";
}

}  // namespace adpop
