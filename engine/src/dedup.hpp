// The impression dedup table every shard shares.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

namespace adpop {

// Impressions seen recently, shared by all shards without a lock: a fixed open-addressing
// table of (key, time) claimed with compare-and-swap. Approximate by design: under extreme
// load an old entry can be overwritten early, never a fresh one.
class DedupTable {
 public:
  explicit DedupTable(std::size_t slots_pow2 = 1u << 20);
  // True if `key` was seen within `window_s` of `now_s`; records it either way.
  bool seen(std::uint64_t key, std::uint32_t now_s, std::uint32_t window_s);

 private:
  struct Slot {
    std::atomic<std::uint64_t> key{0};
    std::atomic<std::uint32_t> time{0};
  };
  std::unique_ptr<Slot[]> slots_;
  std::size_t mask_;
};

}  // namespace adpop
