#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>

#include "pacing.hpp"

namespace adpop {
namespace {

constexpr std::int64_t kDay = 20000;
constexpr std::int64_t kStart = kDay * 86'400'000 + 3'600'000;  // 01:00 UTC that day
constexpr std::uint32_t kCamp = 0xABCD;

AllowanceSet allowance(std::uint64_t seq, std::uint64_t cap, std::int64_t issued = kStart,
                       std::uint64_t origin_spent = 0) {
  AllowanceSet set;
  set.seq = seq;
  set.issued_ms = issued;
  set.interval_end_ms = issued + 10'000;
  set.expires_ms = issued + 30'000;
  set.day = kDay;
  set.campaigns.push_back({kCamp, cap, origin_spent, 0});
  return set;
}

TEST(Pacing, NothingServesWithoutAnAllowance) {
  Pacing pacing(1, 16);
  ShardPacer shard(pacing, 0);
  shard.tick(kStart);
  EXPECT_EQ(shard.admit(kCamp, 1000, kStart, 0), PaceResult::kNoAllowance);
  std::string error;
  ASSERT_TRUE(pacing.install(allowance(1, 1'000'000), &error)) << error;
  EXPECT_EQ(shard.admit(kCamp, 1000, kStart, 0), PaceResult::kNoAllowance);  // not seen until a tick
  shard.tick(kStart);
  EXPECT_EQ(shard.admit(kCamp, 1000, kStart, 0), PaceResult::kPass);
  EXPECT_EQ(shard.admit(kCamp + 1, 1000, kStart, 0), PaceResult::kNoAllowance);
}

TEST(Pacing, AnOlderOrEqualSequenceIsRefused) {
  Pacing pacing(1, 16);
  std::string error;
  ASSERT_TRUE(pacing.install(allowance(5, 1000), &error));
  EXPECT_FALSE(pacing.install(allowance(5, 2000), &error));
  EXPECT_NE(error.find("not above"), std::string::npos);
  EXPECT_FALSE(pacing.install(allowance(4, 2000), &error));
  EXPECT_EQ(pacing.current()->seq, 5u);
}

TEST(Pacing, ChargesAndReservationsStopAtTheCap) {
  Pacing pacing(1, 16);
  ShardPacer shard(pacing, 0);
  std::string error;
  ASSERT_TRUE(pacing.install(allowance(1, 10'000), &error));
  shard.tick(kStart);
  // Reservations alone: ten choices at 1,000 each fill the cap before any impression.
  int admitted = 0;
  for (int i = 0; i < 100; ++i) {
    if (shard.admit(kCamp, 1000, kStart, 0) != PaceResult::kPass) continue;
    shard.reserve(kCamp, 1000, kStart);
    ++admitted;
  }
  EXPECT_EQ(admitted, 10);
  EXPECT_EQ(shard.admit(kCamp, 1000, kStart, 0), PaceResult::kSpent);
  // Their impressions turn reservations into spend; the cap still holds.
  for (int i = 0; i < 10; ++i) shard.charge(kCamp, 1000, kStart + 10);
  shard.tick(kStart + 100);
  EXPECT_EQ(shard.admit(kCamp, 1000, kStart + 100, 0), PaceResult::kSpent);
  auto figures = pacing.figures();
  ASSERT_EQ(figures.size(), 1u);
  EXPECT_EQ(figures[0].spent, 10'000u);
  EXPECT_EQ(figures[0].reserved, 0u);
}

TEST(Pacing, ReservationsOfAdsNeverShownExpire) {
  Pacing pacing(1, 16);
  ShardPacer shard(pacing, 0);
  std::string error;
  AllowanceSet set = allowance(1, 5'000);
  set.expires_ms = kStart + 120'000;
  ASSERT_TRUE(pacing.install(std::move(set), &error));
  shard.tick(kStart);
  for (int i = 0; i < 5; ++i) shard.reserve(kCamp, 1000, kStart);
  EXPECT_EQ(shard.admit(kCamp, 1000, kStart, 0), PaceResult::kSpent);
  shard.tick(kStart + 31'000);  // two buckets later nothing is held
  EXPECT_NE(shard.admit(kCamp, 1000, kStart + 31'000, 0), PaceResult::kSpent);
}

TEST(Pacing, TheOriginsFigureIsAFloor) {
  // An engine that lost its counters (restart, cache gone) still knows what the origin stored.
  Pacing pacing(1, 16);
  ShardPacer shard(pacing, 0);
  std::string error;
  ASSERT_TRUE(pacing.install(allowance(1, 10'000, kStart, 9'500), &error));
  shard.tick(kStart);
  EXPECT_EQ(shard.admit(kCamp, 1000, kStart, 0), PaceResult::kSpent);
}

TEST(Pacing, AnExpiredAllowanceServesNothing) {
  Pacing pacing(1, 16);
  ShardPacer shard(pacing, 0);
  std::string error;
  ASSERT_TRUE(pacing.install(allowance(1, 1'000'000), &error));
  shard.tick(kStart);
  EXPECT_EQ(shard.admit(kCamp, 1000, kStart + 29'999, 0), PaceResult::kPass);
  shard.tick(kStart + 30'000);
  EXPECT_EQ(shard.admit(kCamp, 1000, kStart + 30'000, 0), PaceResult::kNoAllowance);
}

TEST(Pacing, ShardsSeeEachOthersSpend) {
  Pacing pacing(2, 16);
  ShardPacer a(pacing, 0), b(pacing, 1);
  std::string error;
  ASSERT_TRUE(pacing.install(allowance(1, 10'000), &error));
  a.tick(kStart);
  b.tick(kStart);
  for (int i = 0; i < 9; ++i) {
    b.reserve(kCamp, 1000, kStart);
    b.charge(kCamp, 1000, kStart);
  }
  EXPECT_EQ(a.admit(kCamp, 1000, kStart, 0), PaceResult::kPass);  // not published yet
  b.tick(kStart + 100);
  a.tick(kStart + 100);
  a.reserve(kCamp, 1000, kStart + 100);
  EXPECT_EQ(a.admit(kCamp, 1000, kStart + 100, 0), PaceResult::kSpent);
  EXPECT_EQ(pacing.figures()[0].spent, 9'000u);
}

TEST(Pacing, ANewDayStartsOver) {
  Pacing pacing(1, 16);
  ShardPacer shard(pacing, 0);
  std::string error;
  ASSERT_TRUE(pacing.install(allowance(1, 2'000), &error));
  shard.tick(kStart);
  shard.charge(kCamp, 2'000, kStart);
  EXPECT_EQ(shard.admit(kCamp, 1000, kStart, 0), PaceResult::kSpent);
  // The next day's allowance, with a new slot map: the spend of yesterday is gone.
  AllowanceSet next = allowance(2, 2'000, kStart + 86'400'000);
  next.day = kDay + 1;
  ASSERT_TRUE(pacing.install(std::move(next), &error));
  shard.tick(kStart + 86'400'000);
  EXPECT_EQ(shard.admit(kCamp, 1000, kStart + 86'400'000, 0), PaceResult::kPass);
  // Yesterday's allowance is not today's.
  EXPECT_EQ(shard.admit(kCamp, 1000, kStart + 2 * 86'400'000, 0), PaceResult::kNoAllowance);
}

// A steady demand five times the allowance: the controller spreads the allowance over the
// interval (each half within 30% of the other) and spends most of it, never more.
TEST(Pacing, TheRateSpreadsAnAllowanceOverItsInterval) {
  Pacing pacing(1, 16);
  ShardPacer shard(pacing, 0);
  std::string error;
  ASSERT_TRUE(pacing.install(allowance(1, 2'000'000), &error));  // 10 s of interval
  std::mt19937_64 rng(7);
  std::uint64_t halves[2] = {0, 0};
  for (std::int64_t t = kStart; t < kStart + 10'000; t += 1) {  // 1,000 requests a second
    if ((t - kStart) % 100 == 0) shard.tick(t);
    if (shard.admit(kCamp, 1000, t, rng()) != PaceResult::kPass) continue;
    shard.reserve(kCamp, 1000, t);
    shard.charge(kCamp, 1000, t);
    halves[t - kStart < 5'000 ? 0 : 1] += 1000;
  }
  const double total = static_cast<double>(halves[0] + halves[1]);
  EXPECT_LE(total, 2'000'000);
  EXPECT_GE(total, 1'800'000);
  EXPECT_NEAR(static_cast<double>(halves[0]) / static_cast<double>(halves[1]), 1.0, 0.3);
}

}  // namespace
}  // namespace adpop

#include "cache_link.hpp"

namespace adpop {
namespace {

TEST(Resp, RepliesParseWholeOrWaitForMore) {
  const std::string in = "+OK\r\n:42\r\n$5\r\nhello\r\n*2\r\n$1\r\na\r\n$-1\r\n-ERR no\r\n";
  std::size_t pos = 0;
  bool bad = false;
  RespValue v;
  ASSERT_TRUE(parse_resp(in, &pos, &v, &bad));
  EXPECT_EQ(v.kind, RespValue::Kind::kString);
  EXPECT_EQ(v.text, "OK");
  ASSERT_TRUE(parse_resp(in, &pos, &v, &bad));
  EXPECT_EQ(v.integer, 42);
  ASSERT_TRUE(parse_resp(in, &pos, &v, &bad));
  EXPECT_EQ(v.text, "hello");
  ASSERT_TRUE(parse_resp(in, &pos, &v, &bad));
  ASSERT_EQ(v.items.size(), 2u);
  EXPECT_EQ(v.items[0].text, "a");
  EXPECT_EQ(v.items[1].kind, RespValue::Kind::kNil);
  ASSERT_TRUE(parse_resp(in, &pos, &v, &bad));
  EXPECT_EQ(v.kind, RespValue::Kind::kError);
  EXPECT_EQ(pos, in.size());
  EXPECT_FALSE(bad);
  // Every cut of a reply waits for the rest, and never reads past what is there.
  const std::string whole = "*2\r\n$3\r\nabc\r\n:7\r\n";
  for (std::size_t cut = 0; cut < whole.size(); ++cut) {
    std::size_t p = 0;
    bool b = false;
    RespValue r;
    EXPECT_FALSE(parse_resp(std::string_view(whole).substr(0, cut), &p, &r, &b)) << cut;
    EXPECT_FALSE(b);
    EXPECT_EQ(p, 0u);
  }
  // Garbage is an error, not a wait.
  for (const char* junk : {"?x\r\n", "$-5\r\n", ":12a\r\n", "*99999999\r\n"}) {
    std::size_t p = 0;
    bool b = false;
    RespValue r;
    EXPECT_FALSE(parse_resp(junk, &p, &r, &b));
    EXPECT_TRUE(b) << junk;
  }
}

}  // namespace
}  // namespace adpop
