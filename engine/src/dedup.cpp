#include "dedup.hpp"

namespace adpop {

DedupTable::DedupTable(std::size_t slots_pow2) : slots_(new Slot[slots_pow2]), mask_(slots_pow2 - 1) {}

bool DedupTable::seen(std::uint64_t key, std::uint32_t now, std::uint32_t window) {
  if (key == 0) key = 1;  // 0 marks an empty slot
  const std::size_t start = static_cast<std::size_t>(key * 0x9E3779B97F4A7C15ULL >> 20) & mask_;
  for (std::size_t probe = 0; probe < 8; ++probe) {
    Slot& s = slots_[(start + probe) & mask_];
    std::uint64_t k = s.key.load(std::memory_order_acquire);
    if (k == key) {
      std::uint32_t t = s.time.load(std::memory_order_relaxed);
      if (now - t < window) return true;
      s.time.store(now, std::memory_order_relaxed);
      return false;
    }
    const bool expired = k != 0 && now - s.time.load(std::memory_order_relaxed) >= window;
    if (k == 0 || expired) {
      if (s.key.compare_exchange_strong(k, key, std::memory_order_acq_rel)) {
        s.time.store(now, std::memory_order_relaxed);
        return false;
      }
      if (k == key) return true;  // another shard recorded the same impression just now
    }
  }
  // Every probed slot holds a live entry: overwrite the first (the table is sized so this
  // is rare; an early overwrite can only miss a duplicate, never invent one).
  Slot& s = slots_[start];
  s.key.store(key, std::memory_order_release);
  s.time.store(now, std::memory_order_relaxed);
  return false;
}

}  // namespace adpop
