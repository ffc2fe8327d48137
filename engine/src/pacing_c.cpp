// The engine's pacing code behind a C interface, for the pacing simulation (bench/) and the
// tests: a simulated PoP is one Pacing with one ShardPacer, driven by simulated time. Nothing
// here decides differently from the engine; `adpop_pacing_serve` only loops over requests.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>

#include "pacing.hpp"

namespace {
struct SimPop {
  adpop::Pacing pacing;
  adpop::ShardPacer shard;
  std::int64_t ticked_ms = -1;
  std::string error;
  explicit SimPop(std::uint32_t capacity) : pacing(1, capacity), shard(pacing, 0) {}
};
// The engine ticks every 100 ms; the simulation does the same in simulated time.
constexpr std::int64_t kTickMs = 100;
void tick_to(SimPop& pop, std::int64_t now_ms) {
  if (pop.ticked_ms >= 0 && now_ms - pop.ticked_ms < kTickMs) return;
  pop.shard.tick(now_ms);
  pop.ticked_ms = now_ms;
}
}  // namespace

extern "C" {

void* adpop_pacing_new(std::uint32_t capacity) {
  return new SimPop(capacity);
}

void adpop_pacing_free(void* pop) {
  delete static_cast<SimPop*>(pop);
}

// Returns 1 when installed, 0 with the reason in adpop_pacing_error.
int adpop_pacing_install(void* handle, std::uint64_t seq, std::int64_t issued_ms,
                         std::int64_t interval_end_ms, std::int64_t expires_ms, std::int64_t day,
                         std::uint32_t n, const std::uint32_t* id_hashes, const std::uint64_t* caps,
                         const std::uint64_t* origin_spent) {
  auto& pop = *static_cast<SimPop*>(handle);
  adpop::AllowanceSet set;
  set.seq = seq;
  set.issued_ms = issued_ms;
  set.interval_end_ms = interval_end_ms;
  set.expires_ms = expires_ms;
  set.day = day;
  set.campaigns.reserve(n);
  for (std::uint32_t i = 0; i < n; ++i) set.campaigns.push_back({id_hashes[i], caps[i], origin_spent[i], 0});
  return pop.pacing.install(std::move(set), &pop.error) ? 1 : 0;
}

const char* adpop_pacing_error(void* handle) {
  return static_cast<SimPop*>(handle)->error.c_str();
}

void adpop_pacing_tick(void* handle, std::int64_t now_ms) {
  auto& pop = *static_cast<SimPop*>(handle);
  pop.shard.tick(now_ms);
  pop.ticked_ms = now_ms;
}

// Requests in time order; request i's candidates are candidates[offsets[i]..offsets[i+1]),
// in the order the decision would try them. The first one pacing admits is chosen (its
// reservation made) and written to chosen[i]; -1 when none. Ticks as the engine does.
void adpop_pacing_serve(void* handle, std::uint32_t n, const std::int64_t* times_ms,
                        const std::uint32_t* offsets, const std::uint32_t* candidates,
                        const std::uint64_t* prices, const std::uint64_t* rolls, std::int32_t* chosen) {
  auto& pop = *static_cast<SimPop*>(handle);
  for (std::uint32_t i = 0; i < n; ++i) {
    tick_to(pop, times_ms[i]);
    chosen[i] = -1;
    for (std::uint32_t k = offsets[i]; k < offsets[i + 1]; ++k) {
      const auto r = pop.shard.admit(candidates[k], prices[k], times_ms[i], rolls[k]);
      if (r != adpop::PaceResult::kPass) continue;
      pop.shard.reserve(candidates[k], prices[k], times_ms[i]);
      chosen[i] = static_cast<std::int32_t>(k);
      break;
    }
  }
}

// Impressions in time order.
void adpop_pacing_charge(void* handle, std::uint32_t n, const std::int64_t* times_ms,
                         const std::uint32_t* id_hashes, const std::uint64_t* prices) {
  auto& pop = *static_cast<SimPop*>(handle);
  for (std::uint32_t i = 0; i < n; ++i) {
    tick_to(pop, times_ms[i]);
    pop.shard.charge(id_hashes[i], prices[i], times_ms[i]);
  }
}

// One campaign's figures: cap, spent, reserved, eligible, throttled; pass rate in ppm.
// Returns 0 when the campaign has no allowance.
int adpop_pacing_figures(void* handle, std::uint32_t id_hash, std::uint64_t* out5, std::uint32_t* pass_ppm) {
  auto& pop = *static_cast<SimPop*>(handle);
  for (const auto& f : pop.pacing.figures()) {
    if (f.id_hash != id_hash) continue;
    out5[0] = f.cap;
    out5[1] = f.spent;
    out5[2] = f.reserved;
    out5[3] = f.eligible;
    out5[4] = f.throttled;
    *pass_ppm = static_cast<std::uint32_t>(f.pass_rate * 1'000'000);
    return 1;
  }
  return 0;
}

// What a PoP reports to the origin, per campaign in `id_hashes` (0 for one it has no
// allowance for): decisions that asked about it today and its spend today.
void adpop_pacing_report(void* handle, std::uint32_t n, const std::uint32_t* id_hashes,
                         std::uint64_t* eligible, std::uint64_t* spent) {
  auto& pop = *static_cast<SimPop*>(handle);
  for (std::uint32_t i = 0; i < n; ++i) eligible[i] = spent[i] = 0;
  const auto figures = pop.pacing.figures();  // sorted by id hash, as the set is
  for (std::uint32_t i = 0; i < n; ++i) {
    auto it = std::lower_bound(figures.begin(), figures.end(), id_hashes[i],
                               [](const adpop::PaceFigures& f, std::uint32_t h) { return f.id_hash < h; });
    if (it == figures.end() || it->id_hash != id_hashes[i]) continue;
    eligible[i] = it->eligible;
    spent[i] = it->spent;
  }
}

}  // extern "C"
