// Budget pacing on a PoP: the origin's allowances, spend charged at impressions, reservations
// at decisions, and the pass-through rate that spends an allowance evenly over its interval.
//
// The origin gives this PoP, per budgeted campaign, a cap on what the PoP may have spent by
// the end of today (cumulative, UTC day), valid until `expires`. The PoP never lets its spend
// plus what its recent decisions can still cost (reservations) pass that cap, so across the
// fleet spend stays inside the sum of the caps the origin gave, which it keeps inside the
// budget. Without a current allowance a budgeted campaign does not serve: losing the origin
// can never overspend.
//
// `Pacing` is engine-wide: the installed allowance set (a generation pointer the admin thread
// swaps) and each shard's published figures (atomics, one cache line per shard and
// campaign). `ShardPacer` is one shard's: its own live counters and the hot-path check, which
// reads only shard-local memory. Shards publish and recompute rates on their tick. The same
// code runs in the origin's simulation bench through pacing_c.cpp.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace adpop {

enum class PaceResult : std::uint8_t { kPass, kNoAllowance, kSpent, kThrottled, kStarting };
const char* pace_name(PaceResult result);

struct CampaignAllowance {
  std::uint32_t id_hash = 0;       // crc32 of the campaign id, as in the snapshot
  std::uint64_t cap_micros = 0;    // this PoP's spend today may reach this, no more
  std::uint64_t origin_spent = 0;  // this PoP's spend today as the origin has stored it
  std::uint32_t slot = 0;          // set by Pacing::install
};

struct AllowanceSet {
  std::uint64_t seq = 0;                     // only goes up
  std::int64_t issued_ms = 0;                // unix milliseconds
  std::int64_t interval_end_ms = 0;          // spend evenly until here
  std::int64_t expires_ms = 0;               // then keep the rest until here, and stop
  std::int64_t day = 0;                      // the UTC day (unix seconds / 86400) the caps are for
  std::vector<CampaignAllowance> campaigns;  // sorted by id_hash, unique
  const CampaignAllowance* find(std::uint32_t id_hash) const;
};

// One campaign's figures, PoP-wide, for status and explain.
struct PaceFigures {
  std::uint32_t id_hash = 0;
  std::uint64_t cap = 0;
  std::uint64_t spent = 0;      // max(this PoP's charged impressions, the origin's figure)
  std::uint64_t reserved = 0;   // expected cost of recent decisions not yet shown
  std::uint64_t eligible = 0;   // decisions that asked pacing about it today
  std::uint64_t throttled = 0;  // of those, held back by the rate or the cap
  double pass_rate = 0;         // shard 0's current pass-through rate, 0-1
};

class Pacing {
 public:
  // `capacity`: campaigns with an allowance in one day (slots are kept for the day).
  Pacing(std::uint32_t shards, std::uint32_t capacity);

  // Admin side. Refuses (false, a reason) a set whose seq is not above the installed one's,
  // that is unsorted, or that would need more slots than `capacity`.
  bool install(AllowanceSet set, std::string* error);
  std::shared_ptr<const AllowanceSet> current() const;
  std::uint64_t generation() const { return generation_.load(std::memory_order_acquire); }
  std::uint32_t shards() const { return shards_; }
  std::uint32_t capacity() const { return capacity_; }
  std::vector<PaceFigures> figures() const;
  // Shards still waiting for their figures from the cache (what explain's observer says).
  std::uint32_t restoring() const { return restoring_.load(std::memory_order_acquire); }

  // What each shard publishes on its tick, per campaign slot.
  struct alignas(64) Cell {
    std::atomic<std::int64_t> day{-1};
    std::atomic<std::uint64_t> spent{0};
    std::atomic<std::uint64_t> reserved{0};      // this bucket's and the last one's
    std::atomic<std::uint64_t> shown{0};         // impression value, the same buckets
    std::atomic<std::uint64_t> chosen_value{0};  // cumulative today: reserved value of choices
    std::atomic<std::uint64_t> chosen{0};        // cumulative today: choices
    std::atomic<std::uint64_t> eligible{0};
    std::atomic<std::uint64_t> throttled{0};
    std::atomic<std::uint32_t> pass_ppm{0};
  };
  Cell& cell(std::uint32_t slot, std::uint32_t shard) { return cells_[std::size_t{slot} * shards_ + shard]; }
  const Cell& cell(std::uint32_t slot, std::uint32_t shard) const {
    return cells_[std::size_t{slot} * shards_ + shard];
  }

 private:
  std::uint32_t shards_;
  std::uint32_t capacity_;
  std::unique_ptr<Cell[]> cells_;
  mutable std::mutex mutex_;  // admin side only: install and the slot map
  std::shared_ptr<const AllowanceSet> current_;
  std::atomic<std::uint64_t> generation_{0};
  std::vector<std::pair<std::uint32_t, std::uint32_t>> slot_of_;  // (id_hash, slot), sorted
  std::int64_t slots_day_ = -1;
  std::atomic<std::uint32_t> restoring_{0};
  friend class ShardPacer;
};

class ShardPacer {
 public:
  // An observer (explain) reads every shard's figures and the rate shard 0 chose, and
  // publishes nothing.
  static constexpr std::uint32_t kObserver = 0xFFFFFFFF;
  ShardPacer(Pacing& pacing, std::uint32_t shard);

  // Whether a budgeted campaign may be chosen now, at `price` micros per impression.
  PaceResult admit(std::uint32_t id_hash, std::uint64_t price, std::int64_t now_ms, std::uint64_t roll);
  // A decision chose it: reserve what its impression is expected to cost.
  void reserve(std::uint32_t id_hash, std::uint64_t price, std::int64_t now_ms);
  // Its impression was shown: charge the price.
  void charge(std::uint32_t id_hash, std::uint64_t price, std::int64_t now_ms);
  // Picks up a new allowance set, publishes this shard's figures and recomputes the rates.
  void tick(std::int64_t now_ms);

  // What outlives the engine process (engine/CACHE.md): figures read back from the cache at
  // start, added to a campaign's when its allowance arrives; until `restored()` budgeted
  // campaigns wait (kStarting). A shard with no cache, or whose cache did not answer, is
  // restored empty and lives on the origin's figure.
  void carry(std::int64_t day, std::uint32_t id_hash, std::uint64_t spent, std::uint64_t reserved,
             std::uint64_t shown, std::int64_t bucket);
  void expect_restore() {
    if (restored_) pacing_.restoring_.fetch_add(1);
    restored_ = false;
  }
  void set_restored() {
    if (!restored_) pacing_.restoring_.fetch_sub(1);
    restored_ = true;
  }
  bool restored() const { return restored_; }
  // Each campaign's figures to keep (changed since the last call, or all): its id hash and
  // "spent reserved shown bucket".
  template <typename F>
  void each_to_keep(bool all, F&& fn) {
    if (!set_) return;
    for (const CampaignAllowance& a : set_->campaigns) {
      Local& l = locals_[a.slot];
      // Nothing to keep for a campaign this shard has neither chosen nor charged today.
      if (l.day < 0 || !(all || l.changed) || (l.spent == 0 && l.reserved[0] + l.reserved[1] == 0)) continue;
      l.changed = false;
      fn(l.day, a.id_hash, l.spent, l.reserved[0] + l.reserved[1], l.shown[0] + l.shown[1], l.bucket);
    }
  }
  // Calls to admit so far: a decision that asked pacing anything.
  std::uint64_t asked() const { return asked_; }

 private:
  struct Local {
    std::int64_t day = -1;
    std::uint64_t spent = 0;
    std::uint64_t reserved[2] = {0, 0};  // current and previous bucket
    std::uint64_t shown[2] = {0, 0};     // impression value, same buckets
    std::uint64_t decisions[2] = {0, 0};
    std::uint64_t impressions[2] = {0, 0};
    std::int64_t bucket = 0;  // now / kBucketMs of reserved[0]
    std::uint64_t chosen_value = 0;
    std::uint64_t chosen = 0;
    std::uint64_t eligible = 0;
    std::uint64_t throttled = 0;
    double impression_rate = 1.0;  // impressions per chosen ad, learnt; 1 until known
    // From the last tick: the other shards' figures and the origin's floor.
    std::uint64_t others_spent = 0;
    std::uint64_t others_reserved = 0;
    std::uint64_t others_shown = 0;
    std::uint64_t floor = 0;
    std::uint32_t pass_ppm = 0;
    // The controller's memory.
    std::uint64_t seen_chosen = 0;  // PoP-wide chosen value at the last tick
    std::int64_t seen_ms = 0;
    double demand = -1;    // PoP-wide value per second it would be chosen at a rate of 1
    bool changed = false;  // since it was last kept in the cache
    // Reservations of the PoP not yet matched by impressions: an ad chosen on one shard may
    // be shown through another, so only the sums over the shards mean anything.
    std::uint64_t pending() const {
      const std::uint64_t r = reserved[0] + reserved[1] + others_reserved;
      const std::uint64_t s = shown[0] + shown[1] + others_shown;
      return r > s ? r - s : 0;
    }
  };
  Local* local(std::uint32_t id_hash, std::int64_t now_ms, const CampaignAllowance** allowance);
  void roll_day(Local& l, std::int64_t day, std::uint32_t id_hash);
  void rotate(Local& l, std::int64_t now_ms);
  void steer(const CampaignAllowance& a, Local& l, std::int64_t now_ms);
  void publish(std::uint32_t slot, const Local& l);
  void read_others(const CampaignAllowance& a, Local& l);

  Pacing& pacing_;
  std::uint32_t shard_;
  std::shared_ptr<const AllowanceSet> set_;
  std::uint64_t generation_ = 0;
  std::vector<Local> locals_;  // by slot
  struct Carried {
    std::int64_t day;
    std::uint64_t spent, reserved, shown;
    std::int64_t bucket;
  };
  std::unordered_map<std::uint32_t, Carried> carried_;  // by id hash
  bool restored_ = true;
  std::uint64_t asked_ = 0;
};

}  // namespace adpop
