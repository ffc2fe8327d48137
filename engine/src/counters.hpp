// What the engine counts, declared once. Each shard owns its counters (written only by its
// thread); the admin thread sums them (Totals) and renders the sums both as the status JSON
// and as the Prometheus text, from the one table of counts below.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>

namespace adpop {

// One shard's counter: written only by its thread (plain relaxed stores, no RMW), read by the
// admin thread and /metrics.
struct Counter {
  std::atomic<std::uint64_t> value{0};
  void add(std::uint64_t n = 1) {
    value.store(value.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
  }
  void set(std::uint64_t n) { value.store(n, std::memory_order_relaxed); }  // for gauges
  std::uint64_t get() const { return value.load(std::memory_order_relaxed); }
};

// Log-linear latency histogram: 8 sub-buckets per power of two of nanoseconds.
struct LatencyHistogram {
  static constexpr int kBuckets = 8 * 40;
  Counter buckets[kBuckets];
  Counter sum_ns;  // the exposition's _sum: every recorded duration, exactly
  static int bucket_of(std::uint64_t ns);
  static std::uint64_t upper_ns(int bucket);
  void record(std::uint64_t ns) {
    buckets[bucket_of(ns)].add();
    sum_ns.add(ns);
  }
};

enum Route : std::uint8_t {
  kRouteDecideGet,
  kRouteDecidePost,
  kRouteImpression,
  kRouteClick,
  kRouteHealthz,
  kRouteMetrics,
  kRouteOther,
  kRoutes
};
enum ErrorReason : std::uint8_t {
  kErrBadRequestLine,
  kErrBadHeader,
  kErrBadContentLength,
  kErrHeadersTooLarge,
  kErrTooManyHeaders,
  kErrBodyTooLarge,
  kErrTransferEncoding,
  kErrBadVersion,
  kErrTimeout,
  kErrBadJson,
  kErrBadField,
  kErrNotFound,
  kErrMethod,
  kErrNoSnapshot,
  kErrExplainForbidden,
  kErrConnectionCap,
  kErrDraining,
  kErrTokenMalformed,
  kErrTokenForged,
  kErrTokenExpired,
  kErrUnknownAd,
  kErrFirstByteTimeout,  // connected and never sent a byte within --first-byte-timeout
  kErrIdleEvicted,       // an idle connection closed to admit a new one at the cap
  kErrSpoolFull,         // a pixel whose record had no room: refused, so never acknowledged
  kErrReasons
};
const char* error_reason_name(ErrorReason r);
// The parser's reason for refusing a request, as a counted ErrorReason.
ErrorReason reason_from_parser(const char* name);
inline constexpr const char* kRouteNames[kRoutes] = {"decide_get", "decide_post", "impression", "click",
                                                     "healthz",    "metrics",     "other"};

// Every other count. To add one: a name here and a row in kCountSpecs; the shard calls
// stats_.counts[kName].add() (or .set() for a gauge), and both renderings follow.
enum Count : std::uint8_t {
  kNoFill,
  kImpressions,
  kImpressionsDuplicate,
  kClicks,
  kCapsRejected,
  kSpoolRecords,
  kSpoolWriteErrors,
  kSpoolDropped,
  kSpoolSegmentsClosed,
  kSpoolFullNoFill,
  kSpoolFullRefused,
  kSpoolShedding,
  kConnectionsOpen,
  kConnectionsTotal,
  kIdlePollNs,
  kPolling,
  kCacheUp,
  kCacheConnects,
  kCacheFailed,
  kCacheDegraded,
  kPacingRestored,
  kUserCapsWaits,
  kUserCapsMissed,
  kCounts
};

struct CountSpec {
  const char* group;   // the status JSON object it sits in ("" for the top level)
  const char* key;     // its key there
  const char* metric;  // its Prometheus family; rows of one family are adjacent
  const char* labels;  // the sample's labels in that family ("" for none)
  const char* type;    // "counter" or "gauge"
  const char* help;    // the family's HELP line (read from its first row)
  double scale;        // the metric is the count times this (nanoseconds to seconds)
};

inline constexpr CountSpec kCountSpecs[kCounts] = {
    {"", "no_fill", "adpop_no_fill_total", "", "counter", "Placements answered without an ad.", 1},
    {"events", "impressions", "adpop_events_total", "kind=\"impression\"", "counter",
     "Tracking events by kind.", 1},
    {"events", "impressions_duplicate", "adpop_events_total", "kind=\"impression_duplicate\"", "counter", "",
     1},
    {"events", "clicks", "adpop_events_total", "kind=\"click\"", "counter", "", 1},
    {"events", "cap_tokens_rejected", "adpop_cap_tokens_rejected_total", "", "counter",
     "Cap tokens refused: forged, malformed or another user's.", 1},
    {"spool", "records", "adpop_spool_records_total", "outcome=\"framed\"", "counter",
     "Event records by outcome.", 1},
    {"spool", "write_errors", "adpop_spool_records_total", "outcome=\"write_error\"", "counter", "", 1},
    {"spool", "dropped", "adpop_spool_records_total", "outcome=\"no_spool\"", "counter", "", 1},
    {"spool", "segments_closed", "adpop_spool_segments_closed_total", "", "counter",
     "Spool segments closed, ready to ship.", 1},
    {"spool", "full_no_fill", "adpop_spool_full_total", "answer=\"no_fill\"", "counter",
     "Requests the spool had no room to record: decisions answered no-fill, pixels refused.", 1},
    {"spool", "full_refused", "adpop_spool_full_total", "answer=\"refused\"", "counter", "", 1},
    {"spool", "shedding", "adpop_spool_shedding", "", "gauge",
     "Shards answering no-fill because the spool is full (reason spool_full).", 1},
    {"", "connections", "adpop_connections", "", "gauge", "Open client connections.", 1},
    {"", "connections_total", "adpop_connections_total", "", "counter", "Accepted client connections.", 1},
    {"", "idle_poll_ns", "adpop_idle_poll_seconds_total", "", "counter",
     "Shard time spent polling with nothing to do.", 1e-9},
    {"", "shards_polling", "adpop_shards_polling", "", "gauge",
     "Shards busy enough to poll after their last event.", 1},
    {"cache", "shards_up", "adpop_cache_shards_up", "", "gauge", "Shards whose link to the PoP cache is up.",
     1},
    {"cache", "connects", "adpop_cache_connects_total", "", "counter", "Connections made to the PoP cache.",
     1},
    {"cache", "failed", "adpop_cache_commands_failed_total", "", "counter",
     "Cache commands that got no answer in time (link down, slow or reset).", 1},
    {"cache", "degraded_decisions", "adpop_cache_degraded_decisions_total", "", "counter",
     "Decisions with a budgeted candidate made while the cache could not keep the spend.", 1},
    {"cache", "pacing_restored", "adpop_pacing_restored_total", "", "counter",
     "Campaign figures read back from the cache when the engine started.", 1},
    {"cache", "user_caps_waits", "adpop_cache_user_caps_total", "outcome=\"waited\"", "counter",
     "Requests with a user key and no cap token that waited for the user's counters.", 1},
    {"cache", "user_caps_missed", "adpop_cache_user_caps_total", "outcome=\"missed\"", "counter", "", 1},
};

struct alignas(64) ShardStats {
  Counter requests[kRoutes];
  Counter errors[kErrReasons];
  Counter counts[kCounts];
  LatencyHistogram latency;
  std::atomic<std::uint64_t> seen_generation{0};
};

// Every shard's counters summed: collected once per status or scrape, then rendered.
struct Totals {
  std::uint64_t routes[kRoutes] = {};
  std::uint64_t errors[kErrReasons] = {};
  std::uint64_t counts[kCounts] = {};
  std::uint64_t hist[LatencyHistogram::kBuckets] = {};
  std::uint64_t latency_sum_ns = 0;
  std::uint64_t requests = 0;  // every route's
  void add(const ShardStats& st);
  double quantile_us(double q) const;  // a latency quantile, from the histogram
};

// `"key":value,` for each count of `group` (the caller writes the braces around a group).
void append_counts_json(std::string& out, const Totals& totals, std::string_view group);
// `"reason":count,...` for every error reason, without braces.
void append_errors_json(std::string& out, const Totals& totals);
// The Prometheus text of every count, route, error reason and the latency histogram.
void append_counts_metrics(std::string& out, const Totals& totals);

}  // namespace adpop
