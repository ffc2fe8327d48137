// A shard's connection record, shared by the event loop (shard_loop.cpp) and the routes
// (routes.cpp). Internal to the engine's server.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "server.hpp"

namespace adpop {

constexpr std::size_t kMaxOutput = 1 << 20;  // stop reading a connection that will not read

struct Shard::Conn {
  int fd = -1;
  std::string in;
  std::string out;
  std::size_t out_off = 0;
  std::int64_t last_active_ns = 0;
  std::int64_t request_start_ns = 0;  // first byte of an unfinished request, 0 if none
  bool close_after = false;
  bool closed = true;
  // Accepted while draining: gets health and metrics, but no new decisions.
  bool accepted_draining = false;
  bool metrics_only = false;  // came in on the metrics address: /metrics and /healthz only
  bool sent_any = false;      // has sent at least one byte since it was accepted
  bool read_pending = false;  // reading stopped for backpressure before the socket drained
  bool dirty = false;         // has answers waiting for the end of the event batch
  bool waiting = false;       // its next request waits (briefly) for the cache: not processed
  bool resumed = false;       // that request is being processed again: counted once
};

}  // namespace adpop
