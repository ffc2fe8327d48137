// The serving process: one shard per CPU (pinned thread, own SO_REUSEPORT listener, own
// edge-triggered epoll loop, own counters), an admin thread on a Unix socket, and the
// snapshot slot every shard reads without a lock.
//
// Where each part lives: engine.cpp (start and stop), shard_loop.cpp (a shard's event loop
// and connections), routes.cpp (what each path answers), snapshot_slot.cpp (loading, the
// swap and reclamation), admin.cpp (the admin socket), metrics.cpp (status JSON and
// /metrics), with counters.hpp, dedup.hpp, net.hpp and response.hpp beside them.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "api.hpp"
#include "cache_link.hpp"
#include "counters.hpp"
#include "decide.hpp"
#include "dedup.hpp"
#include "http.hpp"
#include "json.hpp"
#include "net.hpp"
#include "pacing.hpp"
#include "snapshot.hpp"
#include "spool.hpp"
#include "token.hpp"

namespace adpop {

struct EngineOptions {
  std::vector<Endpoint> listen{Endpoint{"127.0.0.1", 8080}};
  // /metrics lives here only, never on the serving addresses (port 0: served nowhere).
  Endpoint metrics;
  std::string admin_path;
  std::string snapshot_dir;  // the `current` link (or a version folder)
  std::uint32_t shards = 1;
  std::vector<int> cpus;  // one per shard; empty: no pinning
  bool hugepages = false;
  std::uint32_t max_connections = 10000;       // whole process; split evenly across shards
  std::uint32_t idle_timeout_ms = 30000;       // keep-alive connection with nothing pending
  std::uint32_t idle_poll_us = 0;              // shard polls this long after its last event before sleeping
  std::uint32_t request_timeout_ms = 10000;    // first byte to complete request (slowloris)
  std::uint32_t first_byte_timeout_ms = 2000;  // a new connection that has sent nothing
  http::Limits http;
  std::string spool_dir;  // empty: events are counted, not kept
  std::uint64_t spool_segment_bytes = 64ull << 20;
  std::uint32_t spool_segment_age_s = 60;
  std::uint64_t spool_max_bytes = 0;  // the PoP's backlog bound (0: the disk is the bound)
  // Per shard, kept free for the impressions and clicks of ads already served: decisions
  // stop (no-fill, spool_full) before pixels do.
  std::uint64_t spool_headroom_bytes = 256 << 10;
  std::string token_key;                   // secret for tracking tokens (file contents)
  std::uint32_t token_ttl_s = 86400;       // how long impression and click URLs stay valid
  std::uint32_t dedup_window_s = 3600;     // impressions of one request and ad count once
  std::uint32_t pacing_campaigns = 16384;  // campaigns with an allowance in one day
  Endpoint cache;                          // the PoP cache (port 0: none), engine/CACHE.md
  std::string cache_password;              // from --cache-password-file
  std::uint32_t cache_timeout_ms = 250;    // a cache command unanswered this long drops the link
  std::uint32_t restore_wait_ms = 2000;    // at start, budgeted campaigns wait this long for it
  std::uint32_t cache_wait_us = 2000;      // a request waits at most this for a user's counters
};

class Engine;

class Shard {
 public:
  Shard(Engine& engine, std::uint32_t index, int cpu);
  ~Shard();
  bool start(std::string* error);
  void join();
  ShardStats& stats() { return stats_; }
  const ShardStats& stats() const { return stats_; }

 private:
  struct Conn;
  void run();
  bool is_listener(int fd) const;
  bool evict_idle();
  void accept_all(int listen_fd);
  void on_readable(Conn& c, bool hangup);
  void process(Conn& c);
  void flush(Conn& c);
  void mark_dirty(Conn& c);
  void close_conn(Conn& c);
  void tick(std::int64_t now_ns);
  void respond_error(Conn& c, int code, ErrorReason reason);
  void handle(Conn& c, const http::Request& req, const Snapshot* snap);
  void handle_decide(Conn& c, const http::Request& req, const Snapshot& snap, bool close);
  void handle_tracking(Conn& c, const http::Request& req, const Snapshot* snap, bool click, bool close);
  bool flush_spool(std::int64_t now_s);
  bool may_record(std::size_t bytes, bool decision);
  // Room asked for before a decision is made: more than a usual decision record; a larger
  // one takes the rest from the shard's headroom.
  static constexpr std::size_t kDecisionRecordBytes = 4096;
  void respond_spool_full(Conn& c, bool close);
  void spool_tracking(EventType type, const TrackingToken& token);
  void charge(const Snapshot* snap, const TrackingToken& token);
  // The PoP cache (shard_cache.cpp): figures kept behind the requests, read back at start.
  void cache_start(std::int64_t now_ns);
  void cache_tick(std::int64_t now_ns);
  void cache_restore(std::int64_t now_ns);
  // A request with a user key and no cap token: the user's counters from the cache. Returns
  // them (possibly none), or nullptr after parking the connection until they arrive or
  // --cache-wait-us passes.
  const std::vector<CapEntry>* user_caps(Conn& c, const Snapshot& snap, std::string_view user_key,
                                         bool* degraded);
  void keep_user_caps(std::string_view user_key);
  void wake_waiting(std::int64_t now_ns);
  bool snapshot_has_caps(const Snapshot& snap);

  Engine& engine_;
  std::uint32_t index_;
  int cpu_;
  std::vector<int> listen_fds_;  // one per --listen address
  int metrics_fd_ = -1;          // shard 0 only: the --metrics-listen address
  int epoll_fd_ = -1;
  std::uint32_t open_ = 0;
  std::uint32_t cap_ = 0;
  std::vector<std::unique_ptr<Conn>> conns_;  // by fd
  std::thread thread_;
  ShardStats stats_;
  ShardPacer pacer_;
  Decider decider_;
  Decision decision_;
  DecideRequest request_;
  std::string scratch_;
  std::string token_scratch_;
  json::Document doc_;              // request JSON, reused
  std::string body_;                // answer JSON, reused
  api::AdFragments fragments_;      // each ad's fixed JSON, per snapshot
  std::int64_t batch_ns_ = 0;       // monotonic time of the current event batch
  std::int64_t batch_wall_ms_ = 0;  // wall-clock time of the current event batch
  std::vector<int> dirty_;
  std::vector<int> sending_;  // the dirty list being flushed (process() may refill dirty_)     // connections
                              // with answers to send after this batch's spool write
  std::unique_ptr<Spool> spool_;
  std::unique_ptr<CacheLink> cache_;
  bool restore_sent_ = false;
  std::int64_t restore_deadline_ns_ = 0;
  std::uint32_t keep_ticks_ = 0;
  std::vector<std::uint64_t> dedup_keys_;  // impressions counted since the last tick
  std::vector<std::string> cache_args_;    // scratch for one command's arguments
  struct UserCaps {
    std::vector<CapEntry> entries;
    std::int64_t fetched_ns = 0;  // when answered, or given up on (0: never)
    bool answered = false;        // false after a wait ran out: none known
    bool asked = false;           // a GET is on its way
  };
  std::unordered_map<std::uint64_t, UserCaps> users_;  // by user hash
  struct Waiter {
    int fd;
    std::uint64_t user;
    std::int64_t parked_ns;
    std::int64_t deadline_ns;
  };
  std::vector<Waiter> waiting_;
  std::string json_copy_;  // a POST body parsed from here, so a parked request can be read again
  const Snapshot* caps_checked_ = nullptr;
  bool caps_in_snapshot_ = false;
};

class Engine {
 public:
  explicit Engine(EngineOptions options);
  ~Engine();

  // Loads the snapshot, binds everything and starts the shards and the admin thread.
  bool start(std::string* error);
  // Blocks until stop() (or SIGTERM/SIGINT via the caller) and then shuts down.
  void wait();
  void stop() { stopping_.store(true); }
  void request_reload() { reload_requested_.store(true); }

  // Re-reads the snapshot folder and swaps it in; returns false with a reason on refusal.
  bool load(std::string* error);
  void drain(bool on) { draining_.store(on); }

  const EngineOptions& options() const { return options_; }
  bool draining() const { return draining_.load(std::memory_order_relaxed); }
  bool stopping() const { return stopping_.load(std::memory_order_relaxed); }
  // The current snapshot and the generation it belongs to (see Shard::run for the protocol).
  std::uint64_t generation() const { return generation_.load(std::memory_order_acquire); }
  const Snapshot* acquire(std::uint64_t* generation) const {
    *generation = generation_.load(std::memory_order_acquire);
    return current_.load(std::memory_order_acquire);
  }
  // The engine's own health: "ok", "draining" or "no snapshot". The one definition: /healthz
  // answers it (200 only for "ok", so a balancer stops sending to a draining engine), the
  // status JSON reports it, and the supervisor and sync's health window judge by it
  // (appliance/sync/engine.py, judge).
  static std::string_view health(const Snapshot* snap, bool draining) {
    return draining ? "draining" : snap ? "ok" : "no snapshot";
  }
  std::string status_json();
  std::string pacing_json();
  std::string metrics_text();
  std::int64_t now_seconds() const;
  const TokenSigner& signer() const { return signer_; }
  DedupTable& dedup() { return dedup_; }
  Pacing& pacing() { return pacing_; }
  // Installs the allowances in a JSON body (POST /allowances); false with a reason.
  bool install_allowances(std::string_view body, std::string* error);
  // Bytes in the spool folder, measured by the admin thread every 100 ms.
  std::uint64_t spool_backlog() const { return spool_backlog_.load(std::memory_order_relaxed); }

 private:
  Totals collect() const;
  void admin_loop();
  void handle_admin(int fd);
  void reclaim();
  void watch_spool();

  EngineOptions options_;
  TokenSigner signer_;
  DedupTable dedup_;
  Pacing pacing_;
  std::vector<std::unique_ptr<Shard>> shards_;
  std::atomic<const Snapshot*> current_{nullptr};
  std::atomic<std::uint64_t> generation_{1};
  std::atomic<bool> draining_{false};
  std::atomic<bool> stopping_{false};
  std::atomic<bool> reload_requested_{false};
  std::mutex swap_mutex_;  // admin side only: serialises loads and reclamation
  std::vector<std::pair<std::unique_ptr<Snapshot>, std::uint64_t>> retired_;
  std::unique_ptr<Snapshot> owned_;
  std::string hash_;
  std::string loaded_path_;
  std::uint64_t loads_ok_ = 0;
  std::uint64_t loads_failed_ = 0;
  std::string last_load_error_;
  double last_load_ms_ = 0;  // map + validate + hash of the last good load
  int admin_fd_ = -1;
  std::thread admin_thread_;
  std::int64_t started_ns_ = 0;
  std::atomic<std::uint64_t> spool_backlog_{0};
  std::int64_t spool_checked_ns_ = 0;
  bool spool_shedding_ = false;  // as last logged
  std::uint32_t leftovers_closed_ = 0;
  std::uint64_t leftover_bytes_ = 0;
  // For requests-per-second in status: the total at the previous status call.
  std::uint64_t rate_total_ = 0;
  std::int64_t rate_ns_ = 0;
};

}  // namespace adpop
