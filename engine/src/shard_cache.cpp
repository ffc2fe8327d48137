// What a shard keeps in the PoP cache, and reads back when the engine starts: the key layout
// is engine/CACHE.md (a user's cap counters: shard_user_caps.cpp). Nothing here is on a
// request's path: writes go out with the shard's
// tick, and until the figures are read back (or the cache has had restore_wait_ms to answer)
// budgeted campaigns do not serve, so a restarted engine cannot spend twice.
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "clock.hpp"
#include "server.hpp"
#include "shard_conn.hpp"

namespace adpop {

namespace {
constexpr std::int64_t kKeepSeconds = 2 * 86400;
constexpr std::uint32_t kFullRewriteTicks = 10;  // every second: a cache that restarted empty is whole again

std::string pace_key(std::int64_t day) {
  return "adpop:pace:" + std::to_string(day);
}
std::string dedup_key(std::int64_t hour) {
  return "adpop:dedup:" + std::to_string(hour);
}
}  // namespace

void Shard::cache_start(std::int64_t now_ns) {
  const EngineOptions& o = engine_.options();
  if (o.cache.port == 0) return;
  cache_ = std::make_unique<CacheLink>(o.cache, o.cache_timeout_ms, o.cache_password);
  pacer_.expect_restore();
  restore_deadline_ns_ = now_ns + std::int64_t{o.restore_wait_ms} * 1'000'000;
  cache_->tick(now_ns, epoll_fd_);
}

void Shard::cache_restore(std::int64_t now_ns) {
  const std::int64_t day = batch_wall_ms_ / 86'400'000;
  const std::uint32_t shards = engine_.options().shards;
  restore_sent_ = true;
  cache_->send({"HGETALL", pace_key(day)}, now_ns, [this, day, shards](const RespValue* reply) {
    std::uint64_t carried = 0;
    if (reply && reply->kind == RespValue::Kind::kArray) {
      for (std::size_t i = 0; i + 1 < reply->items.size(); i += 2) {
        const std::string field(reply->items[i].text), value(reply->items[i + 1].text);
        unsigned hash = 0, shard = 0;
        unsigned long long spent = 0, reserved = 0, shown = 0;
        long long bucket = 0;
        if (std::sscanf(field.c_str(), "%8x:%u", &hash, &shard) != 2 ||
            std::sscanf(value.c_str(), "%llu %llu %llu %lld", &spent, &reserved, &shown, &bucket) != 4)
          continue;
        // A shard takes its own figures; shard 0 also those of shards this engine no longer has.
        if (shard != index_ && !(index_ == 0 && shard >= shards)) continue;
        pacer_.carry(day, hash, spent, reserved, shown, bucket);
        ++carried;
      }
      stats_.counts[kPacingRestored].add(carried);
    } else {
      std::fprintf(stderr,
                   "adpop-engine: shard %u: the cache did not give back today's spend; pacing from "
                   "the origin's figures\n",
                   index_);
    }
    pacer_.set_restored();
  });
  if (index_ != 0) return;
  // The impressions counted within the dedup window, back into the shared table.
  const std::uint32_t window = engine_.options().dedup_window_s;
  const std::int64_t now_s = batch_wall_ms_ / 1000;
  for (std::int64_t hour = (now_s - window) / 3600; hour <= now_s / 3600; ++hour) {
    cache_->send({"SMEMBERS", dedup_key(hour)}, now_ns, [this, hour, now_s, window](const RespValue* reply) {
      if (!reply || reply->kind != RespValue::Kind::kArray) return;
      // Counted at the end of its hour at the latest: the window holds it no shorter.
      const auto at = static_cast<std::uint32_t>(std::min(now_s, (hour + 1) * 3600));
      for (const RespValue& m : reply->items) {
        if (m.text.size() != 8) continue;
        std::uint64_t key;
        std::memcpy(&key, m.text.data(), 8);
        engine_.dedup().seen(key, at, window);
      }
    });
  }
}

void Shard::cache_tick(std::int64_t now_ns) {
  if (!cache_) return;
  cache_->tick(now_ns, epoll_fd_);
  stats_.counts[kCacheUp].set(cache_->up() ? 1 : 0);
  stats_.counts[kCacheConnects].set(cache_->connects());
  stats_.counts[kCacheFailed].set(cache_->failed());
  if (!pacer_.restored()) {
    if (!restore_sent_ && cache_->up()) cache_restore(now_ns);
    if (now_ns >= restore_deadline_ns_ && !pacer_.restored()) {
      std::fprintf(stderr,
                   "adpop-engine: shard %u: no answer from the cache at %s; pacing from the origin's "
                   "figures\n",
                   index_, engine_.options().cache.text().c_str());
      pacer_.set_restored();
    }
    cache_->flush(epoll_fd_);
    return;
  }
  const bool all = ++keep_ticks_ % kFullRewriteTicks == 0;
  std::int64_t day = -1;
  cache_args_.assign(2, "");
  pacer_.each_to_keep(all, [&](std::int64_t d, std::uint32_t hash, std::uint64_t spent,
                               std::uint64_t reserved, std::uint64_t shown, std::int64_t bucket) {
    if (day != d && cache_args_.size() > 2) return;  // a day's change: the rest next tick
    day = d;
    char field[32], value[96];
    std::snprintf(field, sizeof field, "%08x:%u", hash, index_);
    std::snprintf(value, sizeof value, "%" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRId64, spent, reserved, shown,
                  bucket);
    cache_args_.emplace_back(field);
    cache_args_.emplace_back(value);
  });
  if (cache_args_.size() > 2 && cache_->up()) {
    cache_args_[0] = "HSET";
    cache_args_[1] = pace_key(day);
    std::vector<std::string_view> args(cache_args_.begin(), cache_args_.end());
    cache_->send(args, now_ns);
    cache_->send({"EXPIRE", cache_args_[1], std::to_string(kKeepSeconds)}, now_ns);
  }
  if (!dedup_keys_.empty() && cache_->up()) {
    const std::int64_t hour = batch_wall_ms_ / 3'600'000;
    cache_args_.assign(2, "");
    cache_args_[0] = "SADD";
    cache_args_[1] = dedup_key(hour);
    for (std::uint64_t key : dedup_keys_) cache_args_.emplace_back(reinterpret_cast<const char*>(&key), 8);
    std::vector<std::string_view> args(cache_args_.begin(), cache_args_.end());
    cache_->send(args, now_ns);
    cache_->send({"EXPIRE", cache_args_[1], std::to_string(engine_.options().dedup_window_s + 3600)}, now_ns);
  }
  dedup_keys_.clear();
  cache_->flush(epoll_fd_);
}

}  // namespace adpop
