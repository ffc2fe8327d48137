// Decision microbenchmark: ns per decision on a compiled payload (ADPOP_BENCH_PAYLOAD).
// Requests look like the HTTP benchmark's: one placement, country, device, os, a few
// segments and keywords. BM_Decide is live traffic: every request at one time, as a PoP sees
// them within a second. BM_DecideReplay gives each request its own time across 200 days of
// flights, as a replay of old decisions would.
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "decide.hpp"

namespace {

struct Fixture {
  std::unique_ptr<adpop::Snapshot> snap;
  std::vector<std::string> storage;
  std::vector<adpop::DecideRequest> requests;
};

Fixture& fixture() {
  static Fixture f = [] {
    Fixture fx;
    const char* path = std::getenv("ADPOP_BENCH_PAYLOAD");
    std::string error;
    if (!path || !(fx.snap = adpop::Snapshot::open(path, false, &error))) {
      std::fprintf(stderr, "bench_decide: set ADPOP_BENCH_PAYLOAD to a payload (%s)\n", error.c_str());
      std::exit(2);
    }
    static const char* countries[] = {"US", "GB", "DE", "FR", "JP", "CA", "BR", "IN"};
    static const char* devices[] = {"desktop", "mobile", "tablet", "ctv"};
    static const char* oses[] = {"android", "ios", "windows", "macos"};
    static const char* placements[] = {"home-top", "home-side", "article-inline", "mobile-banner"};
    std::mt19937_64 rng(11);
    fx.storage.reserve(20000);
    for (int i = 0; i < 1000; ++i) {
      adpop::DecideRequest r;
      fx.storage.push_back("bench-" + std::to_string(i));
      r.id = fx.storage.back();
      r.country = countries[rng() % 8];
      r.device = devices[rng() % 4];
      r.os = oses[rng() % 4];
      for (int s = 0; s < 3; ++s) {
        fx.storage.push_back("seg-" + std::to_string(rng() % 500));
        r.segments.push_back(fx.storage.back());
      }
      fx.storage.push_back("kw" + std::to_string(rng() % 3000));
      r.keywords.push_back(fx.storage.back());
      fx.storage.push_back("site" + std::to_string(rng() % 2000) + ".example");
      r.domain = fx.storage.back();
      r.time = 1767225600 + static_cast<std::int64_t>(rng() % (200 * 86400));  // replay times
      r.placements.push_back({placements[rng() % 4], {}, 1});
      fx.requests.push_back(std::move(r));
    }
    return fx;
  }();
  return f;
}

void run_decisions(benchmark::State& state, bool replay) {
  Fixture& f = fixture();
  adpop::Decider decider;
  adpop::Decision decision;
  std::vector<adpop::DecideRequest> requests = f.requests;
  if (!replay)
    for (auto& r : requests) r.time = 1770000000;
  std::size_t i = 0, filled = 0;
  for (auto _ : state) {
    decider.decide(*f.snap, requests[i], 0, decision);
    filled += decision.placements[0].chosen.size();
    benchmark::DoNotOptimize(decision.placements.data());
    if (++i == requests.size()) i = 0;
  }
  state.counters["filled"] =
      benchmark::Counter(static_cast<double>(filled) / static_cast<double>(state.iterations()));
}

void BM_Decide(benchmark::State& state) {
  run_decisions(state, false);
}
void BM_DecideReplay(benchmark::State& state) {
  run_decisions(state, true);
}
BENCHMARK(BM_Decide)->MinTime(2.0);
BENCHMARK(BM_DecideReplay)->MinTime(2.0);

void BM_Match(benchmark::State& state) {
  Fixture& f = fixture();
  adpop::Matcher matcher;
  adpop::TargetingRequest t;
  std::vector<std::uint32_t> out;
  std::size_t i = 0, matched = 0;
  for (auto _ : state) {
    const auto& r = f.requests[i];
    t.clear();
    t.values[adpop::kCountry].push_back(r.country);
    t.values[adpop::kDevice].push_back(r.device);
    t.values[adpop::kOs].push_back(r.os);
    t.values[adpop::kPlacement].push_back(r.placements[0].id);
    matcher.match_campaigns(*f.snap, t, out);
    matched += out.size();
    if (++i == f.requests.size()) i = 0;
  }
  state.counters["matched"] =
      benchmark::Counter(static_cast<double>(matched) / static_cast<double>(state.iterations()));
}
BENCHMARK(BM_Match)->MinTime(2.0);

}  // namespace

BENCHMARK_MAIN();
