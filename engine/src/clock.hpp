// Clock reads: monotonic for durations and timeouts, wall time for records. Inline: the
// shards read the clock once or twice per event batch.
#pragma once

#include <time.h>

#include <cstdint>

namespace adpop {

inline std::int64_t mono_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

inline std::uint64_t wall_ms() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000 + static_cast<std::uint64_t>(ts.tv_nsec / 1000000);
}

}  // namespace adpop
