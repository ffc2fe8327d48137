// The engine's two reports, both rendered from the same sums (counters.hpp): the status JSON
// the admin socket answers, and the Prometheus text of /metrics.
#include <cstdio>
#include <string>

#include "api.hpp"
#include "clock.hpp"
#include "server.hpp"

namespace adpop {

Totals Engine::collect() const {
  Totals t;
  for (const auto& shard : shards_) t.add(shard->stats());
  return t;
}

std::string Engine::status_json() {
  const Totals totals = collect();
  const std::int64_t now = mono_ns();
  double rps = 0;
  if (now > rate_ns_)
    rps = static_cast<double>(totals.requests - rate_total_) * 1e9 / static_cast<double>(now - rate_ns_);
  rate_total_ = totals.requests;
  rate_ns_ = now;
  const Snapshot* snap = current_.load();
  std::string s = "{";
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "\"version\":%llu,\"hash\":\"%s\",\"snapshot_bytes\":%zu,\"hugepages\":%s,"
                "\"campaigns\":%u,\"shards\":%zu,\"draining\":%s,\"health\":\"%s\",\"uptime_s\":%.1f,"
                "\"requests\":%llu,\"requests_per_second\":%.1f,"
                "\"latency_us\":{\"p50\":%.2f,\"p99\":%.2f,\"p999\":%.2f},",
                static_cast<unsigned long long>(snap ? snap->version() : 0), hash_.c_str(),
                snap ? snap->bytes() : 0, snap && snap->on_hugepages() ? "true" : "false",
                snap ? snap->campaigns().size() : 0u, shards_.size(), draining() ? "true" : "false",
                health(snap, draining()).data(), static_cast<double>(now - started_ns_) / 1e9,
                static_cast<unsigned long long>(totals.requests), rps, totals.quantile_us(0.5),
                totals.quantile_us(0.99), totals.quantile_us(0.999));
  s += buf;
  append_counts_json(s, totals, "");
  s += "\"events\":{";
  append_counts_json(s, totals, "events");
  s.back() = '}';
  s += ",\"spool\":{\"enabled\":";
  s += options_.spool_dir.empty() ? "false," : "true,";
  append_counts_json(s, totals, "spool");
  std::snprintf(buf, sizeof buf, "\"backlog_bytes\":%llu,\"max_bytes\":%llu,\"leftovers_closed\":%u}",
                static_cast<unsigned long long>(spool_backlog()),
                static_cast<unsigned long long>(options_.spool_max_bytes), leftovers_closed_);
  s += buf;
  s += ",\"cache\":{\"address\":";
  api::append_json_string(s, options_.cache.port ? options_.cache.text() : "");
  s.push_back(',');
  append_counts_json(s, totals, "cache");
  s.back() = '}';
  s += ",\"errors\":{";
  append_errors_json(s, totals);
  std::snprintf(buf, sizeof buf,
                "},\"loads\":{\"ok\":%llu,\"failed\":%llu,\"retired_pending\":%zu,\"last_ms\":%.1f,"
                "\"last_error\":",
                static_cast<unsigned long long>(loads_ok_), static_cast<unsigned long long>(loads_failed_),
                retired_.size(), last_load_ms_);
  s += buf;
  api::append_json_string(s, last_load_error_);
  s += ",\"path\":";
  api::append_json_string(s, loaded_path_);
  s += "},\"pacing\":";
  s += pacing_json();
  s += "}";
  return s;
}

std::string Engine::metrics_text() {
  std::string s;
  append_counts_metrics(s, collect());
  const Snapshot* snap = current_.load(std::memory_order_acquire);
  char buf[512];
  std::snprintf(
      buf, sizeof buf,
      "# HELP adpop_snapshot_version Active snapshot version.\n# TYPE adpop_snapshot_version gauge\n"
      "adpop_snapshot_version %llu\n"
      "# HELP adpop_draining 1 while draining.\n# TYPE adpop_draining gauge\nadpop_draining %d\n",
      static_cast<unsigned long long>(snap ? snap->version() : 0), draining() ? 1 : 0);
  s += buf;
  return s;
}

}  // namespace adpop
