// The dedup table shared by every shard without a lock, driven from several threads at once
// (the ThreadSanitizer build, engine/build-tsan, checks the compare-and-swap for races).
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "dedup.hpp"

namespace {

constexpr int kThreads = 4;
constexpr std::uint64_t kKeys = 20000;

TEST(DedupTable, KeysOfOneThreadCountOnceWhileOthersWrite) {
  adpop::DedupTable table(1u << 18);
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (std::uint64_t i = 1; i <= kKeys; ++i) {
        const std::uint64_t key = (static_cast<std::uint64_t>(t + 1) << 40) | i;
        if (table.seen(key, 1000, 3600)) wrong.fetch_add(1);   // first sight: new
        if (!table.seen(key, 1001, 3600)) wrong.fetch_add(1);  // again: a duplicate
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong.load(), 0);
}

TEST(DedupTable, KeysRacedByEveryThreadAreNewOnceAtLeastAndThenRemembered) {
  adpop::DedupTable table(1u << 12);
  std::atomic<int> fresh{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (std::uint64_t i = 1; i <= 2000; ++i)
        if (!table.seen(i, 5000, 3600)) fresh.fetch_add(1);
    });
  }
  for (auto& th : threads) th.join();
  // Each key is new for one thread at least (a race may let a second through: the table is
  // approximate by design), and whatever the race, it is remembered afterwards.
  EXPECT_GE(fresh.load(), 2000);
  for (std::uint64_t i = 1; i <= 2000; ++i) EXPECT_TRUE(table.seen(i, 5001, 3600)) << i;
}

}  // namespace
