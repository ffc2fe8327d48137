// Frequency caps for requests that carry a user key and no cap token (a server-side caller
// with no client to hold the token): the user's counters live in the PoP cache
// (engine/CACHE.md, adpop:caps:<user>). The one place a request waits on the cache: it is
// parked, its connection reads on but processes nothing, until the counters come or
// --cache-wait-us passes; then it goes on, without them if they did not come (counted).
// Counters are read for every such request (another shard may have counted a moment ago);
// the requests of one user parked together share one read.
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "server.hpp"
#include "shard_conn.hpp"

namespace adpop {

namespace {
constexpr std::size_t kMaxUsers = 100'000;  // per shard; the map starts over past it
constexpr std::size_t kEntryBytes = 15;     // scope, id, window, start, count (little-endian)

std::string caps_key(std::uint64_t user) {
  char text[40];
  std::snprintf(text, sizeof text, "adpop:caps:%016" PRIx64, user);
  return text;
}

void encode_entries(const std::vector<CapEntry>& entries, std::string& out) {
  out.clear();
  for (const CapEntry& e : entries) {
    char b[kEntryBytes];
    b[0] = static_cast<char>(e.scope);
    std::memcpy(b + 1, &e.id, 4);
    std::memcpy(b + 5, &e.window, 4);
    std::memcpy(b + 9, &e.start, 4);
    std::memcpy(b + 13, &e.count, 2);
    out.append(b, kEntryBytes);
  }
}

std::vector<CapEntry> decode_entries(std::string_view in) {
  std::vector<CapEntry> out;
  if (in.size() % kEntryBytes != 0 || in.size() / kEntryBytes > kMaxCapEntries) return out;
  for (std::size_t off = 0; off < in.size(); off += kEntryBytes) {
    CapEntry e;
    e.scope = static_cast<std::uint8_t>(in[off]);
    std::memcpy(&e.id, in.data() + off + 1, 4);
    std::memcpy(&e.window, in.data() + off + 5, 4);
    std::memcpy(&e.start, in.data() + off + 9, 4);
    std::memcpy(&e.count, in.data() + off + 13, 2);
    out.push_back(e);
  }
  return out;
}
}  // namespace

bool Shard::snapshot_has_caps(const Snapshot& snap) {
  if (caps_checked_ != &snap) {
    caps_checked_ = &snap;
    caps_in_snapshot_ = false;
    for (auto camp : snap.campaigns())
      if (camp.getCaps().size() > 0) caps_in_snapshot_ = true;
    for (auto adv : snap.advertisers())
      if (adv.getCapWindows().size() > 0) caps_in_snapshot_ = true;
  }
  return caps_in_snapshot_;
}

const std::vector<CapEntry>* Shard::user_caps(Conn& c, const Snapshot& snap, std::string_view user_key,
                                              bool* degraded) {
  static const std::vector<CapEntry> kNone;
  if (!cache_ || user_key.empty() || !snapshot_has_caps(snap)) return &kNone;
  const std::uint64_t user = request_hash(user_key);
  if (users_.size() >= kMaxUsers && !users_.count(user)) users_.clear();
  UserCaps& u = users_[user];
  // Read (or given up on, or counted here) in this very batch: what the woken request uses.
  if (u.fetched_ns != 0 && u.fetched_ns >= batch_ns_) {
    if (!u.answered) *degraded = true;
    return &u.entries;
  }
  if (!cache_->up()) {
    *degraded = true;
    return &u.entries;
  }
  if (!u.asked) {
    u.asked = true;
    cache_->send({"GET", caps_key(user)}, batch_ns_, [this, user](const RespValue* reply) {
      UserCaps& got = users_[user];
      got.asked = false;
      got.fetched_ns = batch_ns_;
      got.answered = reply != nullptr && reply->kind != RespValue::Kind::kError;
      got.entries = got.answered && reply->kind == RespValue::Kind::kString ? decode_entries(reply->text)
                                                                            : std::vector<CapEntry>{};
    });
    cache_->flush(epoll_fd_);
  }
  c.waiting = true;
  waiting_.push_back(
      {c.fd, user, batch_ns_, batch_ns_ + std::int64_t{engine_.options().cache_wait_us} * 1000});
  stats_.counts[kUserCapsWaits].add();
  return nullptr;
}

void Shard::keep_user_caps(std::string_view user_key) {
  if (!cache_ || !cache_->up()) return;
  const std::uint64_t user = request_hash(user_key);
  UserCaps& u = users_[user];
  u.entries = decider_.caps();
  u.fetched_ns = batch_ns_;
  u.answered = true;
  std::uint32_t longest = 0;
  for (const CapEntry& e : u.entries) longest = std::max(longest, e.window);
  std::string value;
  encode_entries(u.entries, value);
  cache_->send({"SET", caps_key(user), value, "EX", std::to_string(std::max<std::uint32_t>(longest, 60))},
               batch_ns_);
}

// Parked requests go on once their user's counters came, or their wait ran out (then
// without them: counted as missed, and as a decision made without the cache).
void Shard::wake_waiting(std::int64_t now_ns) {
  std::vector<Waiter> due;
  std::size_t kept = 0;
  for (const Waiter& w : waiting_) {
    auto it = users_.find(w.user);
    const bool ready =
        it != users_.end() && it->second.fetched_ns >= w.parked_ns && it->second.fetched_ns != 0;
    if (!ready && now_ns < w.deadline_ns) {
      waiting_[kept++] = w;
      continue;
    }
    if (!ready) {
      UserCaps& u = users_[w.user];
      u.fetched_ns = now_ns;  // none known: the woken request goes on without
      u.answered = false;
      u.entries.clear();
      stats_.counts[kUserCapsMissed].add();
    }
    due.push_back(w);
  }
  waiting_.resize(kept);
  for (const Waiter& w : due) {
    if (w.fd < 0 || static_cast<std::size_t>(w.fd) >= conns_.size() || !conns_[w.fd]) continue;
    Conn& c = *conns_[w.fd];
    if (c.closed || !c.waiting) continue;
    c.waiting = false;
    c.resumed = true;
    process(c);
  }
}

}  // namespace adpop
