// Ranking, caps and pacing on compiled payloads (paths from the pytest wrapper).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <random>
#include <set>

#include "api.hpp"
#include "decide.hpp"
#include "spool.hpp"

namespace adpop {
namespace {

constexpr std::int64_t kPaceNow = 1770000000LL * 1000;

AllowanceSet allowance_for(std::string_view campaign, std::uint64_t cap) {
  AllowanceSet set;
  set.seq = 1;
  set.issued_ms = kPaceNow;
  set.interval_end_ms = kPaceNow + 10'000;
  set.expires_ms = kPaceNow + 30'000;
  set.day = kPaceNow / 86'400'000;
  set.campaigns.push_back({crc32_ieee(campaign.data(), campaign.size()), cap, 0, 0});
  return set;
}

std::unique_ptr<Snapshot> open_env(const char* name) {
  const char* path = std::getenv(name);
  if (!path) return nullptr;
  std::string error;
  auto snap = Snapshot::open(path, false, &error);
  EXPECT_TRUE(snap) << error;
  return snap;
}

const char* kCountries[] = {"US", "GB", "DE", "FR", "JP", "CA"};
const char* kDevices[] = {"desktop", "mobile", "tablet", "ctv"};
const char* kPlacements[] = {"home-top",      "home-side",       "article-inline", "article-bottom",
                             "mobile-banner", "video-companion", "search-results"};

TEST(Ranking, BestTierFirstNoDuplicatesAndReplayable) {
  auto snap = open_env("ADPOP_TEST_PAYLOAD");
  ASSERT_TRUE(snap) << "set ADPOP_TEST_PAYLOAD";
  const auto campaigns = snap->payload().getCampaigns();
  std::mt19937_64 rng(3);
  Decider decider, replay;
  Decision d, again;
  std::size_t filled = 0;
  std::vector<std::string> ids(300);
  for (int i = 0; i < 300; ++i) {
    DecideRequest r;
    ids[i] = "req-" + std::to_string(i);
    r.id = ids[i];
    r.country = kCountries[rng() % 6];
    r.device = kDevices[rng() % 4];
    r.time = 1767225600 + static_cast<std::int64_t>(rng() % (200 * 86400));
    r.explain = true;
    r.placements.push_back({kPlacements[rng() % 7], {}, static_cast<std::uint32_t>(1 + rng() % 4)});
    r.placements.push_back({kPlacements[rng() % 7], {}, 1});
    decider.decide(*snap, r, 0, d);
    replay.decide(*snap, r, 0, again);
    std::set<std::uint32_t> ads;
    for (std::size_t p = 0; p < d.placements.size(); ++p) {
      const auto& pd = d.placements[p];
      ASSERT_EQ(pd.chosen.size(), again.placements[p].chosen.size());
      for (std::size_t j = 0; j < pd.chosen.size(); ++j)
        EXPECT_EQ(pd.chosen[j].ad, again.placements[p].chosen[j].ad) << "not replayable";
      std::uint8_t prev = 0;
      for (const auto& ch : pd.chosen) {
        EXPECT_TRUE(ads.insert(ch.ad).second) << "duplicate ad";
        EXPECT_NE(std::find(pd.eligible.begin(), pd.eligible.end(), ch.campaign), pd.eligible.end());
        EXPECT_GE(campaigns[ch.campaign].getPriority(), prev) << "tiers out of order";
        prev = campaigns[ch.campaign].getPriority();
      }
      if (p == 0 && !pd.chosen.empty()) {
        ++filled;
        std::uint8_t best = 255;
        // Budgeted campaigns have no allowance here: pacing holds them back, and says so.
        for (auto c : pd.eligible) {
          bool paced = false;
          for (const Loss& loss : pd.losses)
            paced = paced || (loss.campaign == c && loss.reason == LossReason::kPacing);
          if (!paced) best = std::min<std::uint8_t>(best, campaigns[c].getPriority());
        }
        EXPECT_EQ(campaigns[pd.chosen[0].campaign].getPriority(), best);
      }
    }
  }
  EXPECT_GT(filled, 100u);
}

TEST(Ranking, LotteryFollowsWeights) {
  // Over many request ids, a tier's campaigns win roughly in proportion to their weights.
  auto snap = open_env("ADPOP_CONTROLS_PAYLOAD");
  ASSERT_TRUE(snap) << "set ADPOP_CONTROLS_PAYLOAD";
  Decider decider;
  Decision d;
  std::map<std::string, int> wins;
  std::vector<std::string> ids(4000);
  for (int i = 0; i < 4000; ++i) {
    DecideRequest r;
    ids[i] = "w-" + std::to_string(i);
    r.id = ids[i];
    r.time = 1770000000;
    r.placements.push_back({"lottery", {}, 1});
    decider.decide(*snap, r, 0, d);
    ASSERT_EQ(d.placements[0].chosen.size(), 1u);
    wins[std::string(
        snap->str(snap->payload().getCampaigns()[d.placements[0].chosen[0].campaign].getId()))]++;
  }
  // Weights 1 : 3 in the controls set.
  EXPECT_NEAR(wins["heavy"] / 4000.0, 0.75, 0.04);
  EXPECT_NEAR(wins["light"] / 4000.0, 0.25, 0.04);
}

TEST(Caps, TokenCapsAfterCount) {
  auto snap = open_env("ADPOP_CONTROLS_PAYLOAD");
  ASSERT_TRUE(snap);
  const TokenSigner signer(std::string(32, 's'));
  Pacing pacing(1, 16);
  ShardPacer pacer(pacing, 0);
  std::string error;
  ASSERT_TRUE(pacing.install(allowance_for("budgeted", 1'000'000'000), &error)) << error;
  pacer.tick(kPaceNow);
  DecideContext ctx{&signer, &pacer, kPaceNow};
  Decider decider;
  Decision d;
  std::string caps;
  std::vector<std::string> served;
  for (int i = 0; i < 3; ++i) {
    DecideRequest r;
    r.id = "c";
    r.user_key = "alice";
    r.caps = caps;
    r.time = 1770000000;
    r.explain = true;
    r.placements.push_back({"slot", {}, 1});
    decider.decide(*snap, r, 0, d, ctx);
    served.emplace_back(
        snap->str(snap->payload().getCampaigns()[d.placements[0].chosen[0].campaign].getId()));
    caps = d.caps;
  }
  EXPECT_EQ(served, (std::vector<std::string>{"capped", "capped", "budgeted"}));
  bool cap_loss = false;
  for (auto& l : d.placements[0].losses) cap_loss = cap_loss || l.reason == LossReason::kCap;
  EXPECT_TRUE(cap_loss) << "explain names the cap";
}

TEST(Pacing, TheAllowanceStopsSpendAndExplainSaysWhy) {
  auto snap = open_env("ADPOP_CONTROLS_PAYLOAD");
  ASSERT_TRUE(snap);
  Pacing pacing(1, 16);
  ShardPacer pacer(pacing, 0);
  Decider decider;
  Decision d;
  auto lost_to_pacing = [&](DecideContext context) {
    DecideRequest r;
    r.id = "p";
    r.time = 1770000000;
    r.explain = true;
    r.placements.push_back({"slot", {}, 2});
    decider.decide(*snap, r, 0, d, context);
    for (const Loss& loss : d.placements[0].losses)
      if (snap->str(snap->campaigns()[loss.campaign].getId()) == "budgeted" &&
          loss.reason == LossReason::kPacing)
        return std::string(pace_name(loss.pacing));
    return std::string();
  };
  // No allowance from the origin: a budgeted campaign does not serve.
  EXPECT_EQ(lost_to_pacing(DecideContext{nullptr, nullptr, kPaceNow}), "no_allowance");
  std::string error;
  ASSERT_TRUE(pacing.install(allowance_for("budgeted", 2'000'000), &error)) << error;
  pacer.tick(kPaceNow);
  int budgeted = 0;
  for (int i = 0; i < 10; ++i) {
    DecideRequest r;
    r.id = "p";
    r.time = 1770000000;
    r.placements.push_back({"slot", {}, 2});
    decider.decide(*snap, r, 0, d, DecideContext{nullptr, &pacer, kPaceNow});
    for (auto& ch : d.placements[0].chosen)
      if (snap->str(snap->payload().getCampaigns()[ch.campaign].getId()) == "budgeted") ++budgeted;
  }
  EXPECT_EQ(budgeted, 2);  // eCPM 1000 reserves 1.00 per ad against an allowance of 2.00
  // Explain names the reason the serving walk saw.
  EXPECT_EQ(lost_to_pacing(DecideContext{nullptr, &pacer, kPaceNow}), "allowance_spent");
}

TEST(Render, CachedAdFieldsMatchAndFollowTheSnapshot) {
  // The same answers with and without the per-shard cache, across two snapshots in turn:
  // the second snapshot's answers never carry the first one's fields.
  auto controls = open_env("ADPOP_CONTROLS_PAYLOAD");
  auto synthetic = open_env("ADPOP_TEST_PAYLOAD");
  ASSERT_TRUE(controls && synthetic);
  api::AdFragments cache;
  int filled = 0;
  for (int round = 0; round < 2; ++round) {
    for (const Snapshot* snap : {controls.get(), synthetic.get()}) {
      for (int i = 0; i < 50; ++i) {
        Decider decider;
        Decision d;
        DecideRequest r;
        const std::string id = "r-" + std::to_string(i);
        r.id = id;
        r.time = 1770000000;
        r.placements.push_back({snap == controls.get() ? "lottery" : "home-top", {}, 3});
        decider.decide(*snap, r, 0, d);
        std::string plain, cached;
        api::render(*snap, r, d, plain);
        api::render(*snap, r, d, cached, nullptr, &cache);
        EXPECT_EQ(plain, cached);
        filled += static_cast<int>(d.placements[0].chosen.size());
      }
    }
  }
  EXPECT_GT(filled, 0);
  // Ad 0 of each snapshot through one cache: each answer names its own snapshot's ad.
  for (const Snapshot* snap : {controls.get(), synthetic.get(), controls.get()}) {
    const auto ad = snap->ads()[0];
    const std::string_view fields = cache.get(*snap, Choice{0, ad.getCampaign(), ad.getCreative()});
    EXPECT_NE(fields.find("\"" + std::string(snap->str(ad.getId())) + "\""), std::string_view::npos)
        << fields;
  }
}

TEST(Time, HourOfWeek) {
  EXPECT_EQ(hour_of_week(0), 3u * 24);                             // Thursday 1970-01-01 00:00
  EXPECT_EQ(hour_of_week(1767225600), 3u * 24);                    // Thursday 2026-01-01 00:00
  EXPECT_EQ(hour_of_week(1767225600 + 4 * 86400 + 5 * 3600), 5u);  // Monday 05:00
}

}  // namespace
}  // namespace adpop
