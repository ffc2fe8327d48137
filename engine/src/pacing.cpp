#include "pacing.hpp"

#include <algorithm>

namespace adpop {

namespace {
// Reservations live one to two buckets: long enough for an ad's impression to come back,
// short enough that a decision whose ad was never shown stops holding budget.
constexpr std::int64_t kBucketMs = 15'000;
constexpr std::uint32_t kFullPass = 1'000'000;
// Impressions per chosen ad are learnt from a bucket with at least this many choices.
constexpr std::uint64_t kLearnFrom = 20;
// The rate holds a campaign back only once the PoP has chosen it this often today: fewer
// choices say nothing about its demand, and the cap bounds what they can spend.
constexpr std::uint64_t kThrottleAfter = 20;
std::int64_t day_of(std::int64_t ms) {
  return ms >= 0 ? ms / 86'400'000 : (ms - 86'399'999) / 86'400'000;
}
}  // namespace

const char* pace_name(PaceResult result) {
  switch (result) {
    case PaceResult::kPass:
      return "pass";
    case PaceResult::kNoAllowance:
      return "no_allowance";
    case PaceResult::kSpent:
      return "allowance_spent";
    case PaceResult::kThrottled:
      return "throttled";
    case PaceResult::kStarting:
      return "starting";
  }
  return "unknown";
}

const CampaignAllowance* AllowanceSet::find(std::uint32_t id_hash) const {
  auto it = std::lower_bound(campaigns.begin(), campaigns.end(), id_hash,
                             [](const CampaignAllowance& a, std::uint32_t h) { return a.id_hash < h; });
  return it != campaigns.end() && it->id_hash == id_hash ? &*it : nullptr;
}

Pacing::Pacing(std::uint32_t shards, std::uint32_t capacity)
    : shards_(std::max<std::uint32_t>(1, shards)),
      capacity_(std::max<std::uint32_t>(1, capacity)),
      cells_(new Cell[std::size_t{capacity_} * shards_]) {}

bool Pacing::install(AllowanceSet set, std::string* error) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (current_ && set.seq <= current_->seq) {
    *error = "allowance sequence " + std::to_string(set.seq) + " is not above the installed " +
             std::to_string(current_->seq);
    return false;
  }
  for (std::size_t i = 1; i < set.campaigns.size(); ++i)
    if (set.campaigns[i - 1].id_hash >= set.campaigns[i].id_hash) {
      *error = "allowance campaigns are not sorted and unique by id hash";
      return false;
    }
  if (set.expires_ms < set.interval_end_ms || set.interval_end_ms < set.issued_ms) {
    *error = "allowance times out of order (issued <= interval_end <= expires)";
    return false;
  }
  // Slots are the day's: a campaign keeps its figures from one interval to the next.
  if (set.day != slots_day_) {
    slots_day_ = set.day;
    slot_of_.clear();
  }
  std::size_t fresh = 0;
  for (const auto& c : set.campaigns) {
    auto it = std::lower_bound(slot_of_.begin(), slot_of_.end(), std::make_pair(c.id_hash, 0u));
    if (it == slot_of_.end() || it->first != c.id_hash) ++fresh;
  }
  if (slot_of_.size() + fresh > capacity_) {
    *error = "allowances for " + std::to_string(slot_of_.size() + fresh) + " campaigns today exceed " +
             std::to_string(capacity_) + " (raise --pacing-campaigns)";
    return false;
  }
  for (auto& c : set.campaigns) {
    auto it = std::lower_bound(slot_of_.begin(), slot_of_.end(), std::make_pair(c.id_hash, 0u));
    if (it == slot_of_.end() || it->first != c.id_hash)
      it = slot_of_.insert(it, {c.id_hash, static_cast<std::uint32_t>(slot_of_.size())});
    c.slot = it->second;
  }
  std::atomic_store_explicit(&current_, std::shared_ptr<const AllowanceSet>(new AllowanceSet(std::move(set))),
                             std::memory_order_release);
  generation_.fetch_add(1, std::memory_order_acq_rel);
  return true;
}

std::shared_ptr<const AllowanceSet> Pacing::current() const {
  return std::atomic_load_explicit(&current_, std::memory_order_acquire);
}

std::vector<PaceFigures> Pacing::figures() const {
  std::vector<PaceFigures> out;
  auto set = current();
  if (!set) return out;
  for (const auto& a : set->campaigns) {
    PaceFigures f;
    f.id_hash = a.id_hash;
    f.cap = a.cap_micros;
    std::uint64_t spent = 0, reserved = 0, shown = 0;
    for (std::uint32_t s = 0; s < shards_; ++s) {
      const Cell& c = cell(a.slot, s);
      if (c.day.load(std::memory_order_relaxed) != set->day) continue;
      spent += c.spent.load(std::memory_order_relaxed);
      reserved += c.reserved.load(std::memory_order_relaxed);
      shown += c.shown.load(std::memory_order_relaxed);
      f.eligible += c.eligible.load(std::memory_order_relaxed);
      f.throttled += c.throttled.load(std::memory_order_relaxed);
    }
    f.spent = std::max(spent, a.origin_spent);
    f.reserved = reserved > shown ? reserved - shown : 0;
    f.pass_rate = cell(a.slot, 0).pass_ppm.load(std::memory_order_relaxed) / double{kFullPass};
    out.push_back(f);
  }
  return out;
}

ShardPacer::ShardPacer(Pacing& pacing, std::uint32_t shard)
    : pacing_(pacing), shard_(shard), locals_(pacing.capacity()) {
  if (shard == kObserver) restored_ = pacing.restoring() == 0;
}

ShardPacer::Local* ShardPacer::local(std::uint32_t id_hash, std::int64_t now_ms,
                                     const CampaignAllowance** allowance) {
  const AllowanceSet* set = set_.get();
  if (!set) return nullptr;
  const CampaignAllowance* a = set->find(id_hash);
  if (!a) return nullptr;
  Local& l = locals_[a->slot];
  roll_day(l, day_of(now_ms), id_hash);
  *allowance = a;
  return &l;
}

void ShardPacer::roll_day(Local& l, std::int64_t day, std::uint32_t id_hash) {
  if (l.day == day) return;
  // A new UTC day (or a slot given to another campaign on one): budgets start over, from
  // what an earlier engine kept in the cache today.
  const double rate = l.day >= 0 ? l.impression_rate : 1.0;
  l = Local{};
  l.day = day;
  l.impression_rate = rate;
  auto it = carried_.find(id_hash);
  if (it != carried_.end() && it->second.day == day) {
    l.spent = it->second.spent;
    l.reserved[1] = it->second.reserved;  // expires with the bucket it was made in
    l.shown[1] = it->second.shown;
    l.bucket = it->second.bucket;
    l.changed = true;
    carried_.erase(it);
  }
}

void ShardPacer::carry(std::int64_t day, std::uint32_t id_hash, std::uint64_t spent, std::uint64_t reserved,
                       std::uint64_t shown, std::int64_t bucket) {
  // A campaign this shard already started the day for takes the figures at once.
  if (const CampaignAllowance* a = set_ ? set_->find(id_hash) : nullptr; a && locals_[a->slot].day == day) {
    Local& l = locals_[a->slot];
    l.spent += spent;
    l.reserved[1] += reserved;
    l.shown[1] += shown;
    l.bucket = std::max(l.bucket, bucket);
    l.changed = true;
    return;
  }
  Carried& c = carried_[id_hash];
  if (c.day != day) c = Carried{day, 0, 0, 0, bucket};
  // Several earlier shards' figures can land in one (an engine that had more shards).
  c.spent += spent;
  c.reserved += reserved;
  c.shown += shown;
  c.bucket = std::max(c.bucket, bucket);
}

PaceResult ShardPacer::admit(std::uint32_t id_hash, std::uint64_t price, std::int64_t now_ms,
                             std::uint64_t roll) {
  const CampaignAllowance* a = nullptr;
  Local* l = local(id_hash, now_ms, &a);
  ++asked_;
  if (!l || now_ms >= set_->expires_ms || day_of(now_ms) != set_->day) return PaceResult::kNoAllowance;
  if (!restored_) return PaceResult::kStarting;
  ++l->eligible;
  auto left = [&] {
    const std::uint64_t spent = std::max(l->floor, l->others_spent + l->spent);
    return static_cast<double>(a->cap_micros) - static_cast<double>(spent + l->pending()) -
           static_cast<double>(price) * l->impression_rate;
  };
  double room = left();
  // Near the cap the other shards' figures from the last tick are not good enough: read
  // what they publish as they go (their own cache lines), so a burst spread over the shards
  // cannot pass the cap between two ticks. Far from it nothing outside this shard is read.
  if (pacing_.shards() > 1 &&
      room < static_cast<double>(a->cap_micros) / 4 + 100.0 * static_cast<double>(price) * pacing_.shards()) {
    read_others(*a, *l);
    room = left();
  }
  if (room < 0) {
    ++l->throttled;
    return PaceResult::kSpent;
  }
  if (l->pass_ppm < kFullPass && roll % kFullPass >= l->pass_ppm) {
    ++l->throttled;
    return PaceResult::kThrottled;
  }
  return PaceResult::kPass;
}

void ShardPacer::reserve(std::uint32_t id_hash, std::uint64_t price, std::int64_t now_ms) {
  const CampaignAllowance* a = nullptr;
  Local* l = local(id_hash, now_ms, &a);
  if (!l) return;
  rotate(*l, now_ms);
  const auto value = static_cast<std::uint64_t>(static_cast<double>(price) * l->impression_rate);
  l->reserved[0] += value;
  ++l->decisions[0];
  l->chosen_value += value;
  ++l->chosen;
  l->changed = true;
  publish(a->slot, *l);
}

void ShardPacer::charge(std::uint32_t id_hash, std::uint64_t price, std::int64_t now_ms) {
  const CampaignAllowance* a = nullptr;
  Local* l = local(id_hash, now_ms, &a);
  // A campaign with no allowance now is still charged by the origin, from the event.
  if (!l) return;
  rotate(*l, now_ms);
  l->spent += price;
  l->shown[0] += price;
  ++l->impressions[0];
  l->changed = true;
  publish(a->slot, *l);
}

// What the cap check of other shards reads between ticks: this shard's own cache line.
void ShardPacer::publish(std::uint32_t slot, const Local& l) {
  if (shard_ == kObserver) return;
  Pacing::Cell& mine = pacing_.cell(slot, shard_);
  mine.day.store(l.day, std::memory_order_relaxed);
  mine.spent.store(l.spent, std::memory_order_relaxed);
  mine.reserved.store(l.reserved[0] + l.reserved[1], std::memory_order_relaxed);
  mine.shown.store(l.shown[0] + l.shown[1], std::memory_order_relaxed);
}

void ShardPacer::read_others(const CampaignAllowance& a, Local& l) {
  std::uint64_t spent = 0, reserved = 0, shown = 0;
  for (std::uint32_t s = 0; s < pacing_.shards(); ++s) {
    if (s == shard_) continue;
    const Pacing::Cell& c = pacing_.cell(a.slot, s);
    if (c.day.load(std::memory_order_relaxed) != l.day) continue;
    spent += c.spent.load(std::memory_order_relaxed);
    reserved += c.reserved.load(std::memory_order_relaxed);
    shown += c.shown.load(std::memory_order_relaxed);
  }
  l.others_spent = spent;
  l.others_reserved = reserved;
  l.others_shown = shown;
}

void ShardPacer::rotate(Local& l, std::int64_t now_ms) {
  // Buckets are aligned to the clock, so every shard's cover the same span and their sums
  // add up across shards (an ad chosen on one shard is often shown through another).
  const std::int64_t bucket = now_ms / kBucketMs;
  if (bucket <= l.bucket) return;
  // Learn impressions per choice from the bucket that just closed; its impressions trail its
  // choices a little, so the rate errs low only briefly and the cap check has the last word.
  if (l.decisions[0] >= kLearnFrom) {
    const double seen = std::clamp(static_cast<double>(l.impressions[0] + l.impressions[1]) /
                                       static_cast<double>(l.decisions[0] + l.decisions[1]),
                                   0.05, 1.0);
    l.impression_rate = 0.7 * l.impression_rate + 0.3 * seen;
  }
  const bool skipped = bucket > l.bucket + 1;
  l.reserved[1] = skipped ? 0 : l.reserved[0];
  l.shown[1] = skipped ? 0 : l.shown[0];
  l.decisions[1] = skipped ? 0 : l.decisions[0];
  l.impressions[1] = skipped ? 0 : l.impressions[0];
  l.reserved[0] = l.shown[0] = l.decisions[0] = l.impressions[0] = 0;
  l.bucket = bucket;
}

void ShardPacer::tick(std::int64_t now_ms) {
  const std::uint64_t generation = pacing_.generation();
  if (generation != generation_) {
    set_ = pacing_.current();
    generation_ = generation;
  }
  if (!set_) return;
  for (const CampaignAllowance& a : set_->campaigns) {
    Local& l = locals_[a.slot];
    roll_day(l, day_of(now_ms), a.id_hash);
    rotate(l, now_ms);
    if (shard_ == ShardPacer::kObserver) {
      steer(a, l, now_ms);
      l.pass_ppm = pacing_.cell(a.slot, 0).pass_ppm.load(std::memory_order_relaxed);
      continue;
    }
    Pacing::Cell& mine = pacing_.cell(a.slot, shard_);
    publish(a.slot, l);
    mine.chosen_value.store(l.chosen_value, std::memory_order_relaxed);
    mine.chosen.store(l.chosen, std::memory_order_relaxed);
    mine.eligible.store(l.eligible, std::memory_order_relaxed);
    mine.throttled.store(l.throttled, std::memory_order_relaxed);
    steer(a, l, now_ms);
    mine.pass_ppm.store(l.pass_ppm, std::memory_order_relaxed);
  }
}

// The controller: the pass-through rate that spends what is left of the allowance evenly
// until the interval ends, from the PoP's demand (the value per second it would choose at a
// rate of 1, learnt from what it chose at the rate it had). It re-aims every tick at what is
// actually left, so an error in the demand estimate corrects itself within the interval.
void ShardPacer::steer(const CampaignAllowance& a, Local& l, std::int64_t now_ms) {
  read_others(a, l);
  std::uint64_t chosen = l.chosen_value, choices = l.chosen;
  for (std::uint32_t s = 0; s < pacing_.shards(); ++s) {
    if (s == shard_) continue;
    const Pacing::Cell& c = pacing_.cell(a.slot, s);
    if (c.day.load(std::memory_order_relaxed) != l.day) continue;
    chosen += c.chosen_value.load(std::memory_order_relaxed);
    choices += c.chosen.load(std::memory_order_relaxed);
  }
  l.floor = a.origin_spent;
  if (l.seen_ms > 0 && now_ms > l.seen_ms && chosen >= l.seen_chosen) {
    const double rate =
        static_cast<double>(chosen - l.seen_chosen) * 1000.0 / static_cast<double>(now_ms - l.seen_ms);
    const double pass = l.pass_ppm / double{kFullPass};
    // At a rate near 0 what is chosen says little about demand: keep the last estimate.
    if (pass >= 0.02) {
      const double estimate = rate / pass;
      l.demand = l.demand < 0 ? estimate : 0.8 * l.demand + 0.2 * estimate;
    }
  }
  l.seen_chosen = chosen;
  l.seen_ms = now_ms;
  const double spent = static_cast<double>(std::max(l.floor, l.others_spent + l.spent));
  const double left = static_cast<double>(a.cap_micros) - spent - static_cast<double>(l.pending());
  if (left <= 0 || now_ms >= set_->expires_ms) {
    l.pass_ppm = 0;
    return;
  }
  const std::int64_t end = now_ms < set_->interval_end_ms ? set_->interval_end_ms : set_->expires_ms;
  const double seconds = std::max(0.1, static_cast<double>(end - now_ms) / 1000.0);
  const double target = left / seconds;
  const double pass =
      l.demand <= 0 || choices < kThrottleAfter ? 1.0 : std::clamp(target / l.demand, 0.0, 1.0);
  l.pass_ppm = static_cast<std::uint32_t>(pass * kFullPass);
}

}  // namespace adpop
