#include "counters.hpp"

#include <algorithm>
#include <cstdio>

namespace adpop {

const char* error_reason_name(ErrorReason r) {
  static const char* names[kErrReasons] = {"bad_request_line",   "bad_header",       "bad_content_length",
                                           "headers_too_large",  "too_many_headers", "body_too_large",
                                           "transfer_encoding",  "bad_version",      "timeout",
                                           "bad_json",           "bad_field",        "not_found",
                                           "method_not_allowed", "no_snapshot",      "explain_forbidden",
                                           "connection_cap",     "draining",         "token_malformed",
                                           "token_forged",       "token_expired",    "unknown_ad",
                                           "first_byte_timeout", "idle_evicted",     "spool_full"};
  return r < kErrReasons ? names[r] : "unknown";
}

ErrorReason reason_from_parser(const char* name) {
  std::string_view r(name);
  if (r == "bad_header") return kErrBadHeader;
  if (r == "bad_content_length") return kErrBadContentLength;
  if (r == "headers_too_large") return kErrHeadersTooLarge;
  if (r == "too_many_headers") return kErrTooManyHeaders;
  if (r == "body_too_large") return kErrBodyTooLarge;
  if (r == "transfer_encoding") return kErrTransferEncoding;
  if (r == "bad_version") return kErrBadVersion;
  return kErrBadRequestLine;
}

int LatencyHistogram::bucket_of(std::uint64_t ns) {
  if (ns < 8) return 0;
  int log = 63 - __builtin_clzll(ns);  // >= 3
  int sub = static_cast<int>((ns >> (log - 3)) & 7);
  int b = (log - 3) * 8 + sub;
  return std::min(b, kBuckets - 1);
}

std::uint64_t LatencyHistogram::upper_ns(int bucket) {
  int log = bucket / 8 + 3;
  int sub = bucket % 8;
  return static_cast<std::uint64_t>(8 + sub + 1) << (log - 3);
}

void Totals::add(const ShardStats& st) {
  for (int r = 0; r < kRoutes; ++r) {
    routes[r] += st.requests[r].get();
    requests += st.requests[r].get();
  }
  for (int e = 0; e < kErrReasons; ++e) errors[e] += st.errors[e].get();
  for (int c = 0; c < kCounts; ++c) counts[c] += st.counts[c].get();
  for (int b = 0; b < LatencyHistogram::kBuckets; ++b) hist[b] += st.latency.buckets[b].get();
  latency_sum_ns += st.latency.sum_ns.get();
}

double Totals::quantile_us(double q) const {
  std::uint64_t total = 0;
  for (auto h : hist) total += h;
  if (total == 0) return 0;
  const std::uint64_t rank = static_cast<std::uint64_t>(q * static_cast<double>(total - 1)) + 1;
  std::uint64_t seen = 0;
  for (int b = 0; b < LatencyHistogram::kBuckets; ++b) {
    seen += hist[b];
    if (seen >= rank) return static_cast<double>(LatencyHistogram::upper_ns(b)) / 1000.0;
  }
  return 0;
}

void append_counts_json(std::string& out, const Totals& totals, std::string_view group) {
  char buf[128];
  for (int c = 0; c < kCounts; ++c) {
    const CountSpec& spec = kCountSpecs[c];
    if (group != spec.group) continue;
    std::snprintf(buf, sizeof buf, "\"%s\":%llu,", spec.key,
                  static_cast<unsigned long long>(totals.counts[c]));
    out += buf;
  }
}

void append_errors_json(std::string& out, const Totals& totals) {
  char buf[128];
  for (int e = 0; e < kErrReasons; ++e) {
    std::snprintf(buf, sizeof buf, "%s\"%s\":%llu", e ? "," : "",
                  error_reason_name(static_cast<ErrorReason>(e)),
                  static_cast<unsigned long long>(totals.errors[e]));
    out += buf;
  }
}

namespace {

void family(std::string& out, const char* name, const char* type, const char* help) {
  out += "# HELP ";
  out += name;
  out += ' ';
  out += help;
  out += "\n# TYPE ";
  out += name;
  out += ' ';
  out += type;
  out += '\n';
}

void latency_metrics(std::string& out, const Totals& totals) {
  char buf[256];
  family(out, "adpop_request_duration_seconds", "histogram", "Time from parsed request to queued answer.");
  static const double kBounds[] = {1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4,
                                   2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2};
  std::uint64_t count = 0;
  int b = 0;
  for (double bound : kBounds) {
    while (b < LatencyHistogram::kBuckets &&
           static_cast<double>(LatencyHistogram::upper_ns(b)) <= bound * 1e9)
      count += totals.hist[b++];
    std::snprintf(buf, sizeof buf, "adpop_request_duration_seconds_bucket{le=\"%g\"} %llu\n", bound,
                  static_cast<unsigned long long>(count));
    out += buf;
  }
  while (b < LatencyHistogram::kBuckets) count += totals.hist[b++];
  std::snprintf(
      buf, sizeof buf,
      "adpop_request_duration_seconds_bucket{le=\"+Inf\"} %llu\nadpop_request_duration_seconds_sum %.9f\n"
      "adpop_request_duration_seconds_count %llu\n",
      static_cast<unsigned long long>(count), static_cast<double>(totals.latency_sum_ns) / 1e9,
      static_cast<unsigned long long>(count));
  out += buf;
}

}  // namespace

void append_counts_metrics(std::string& out, const Totals& totals) {
  char buf[256];
  family(out, "adpop_requests_total", "counter", "Requests by route.");
  for (int r = 0; r < kRoutes; ++r) {
    std::snprintf(buf, sizeof buf, "adpop_requests_total{route=\"%s\"} %llu\n", kRouteNames[r],
                  static_cast<unsigned long long>(totals.routes[r]));
    out += buf;
  }
  family(out, "adpop_errors_total", "counter", "Refused or failed requests by reason.");
  for (int e = 0; e < kErrReasons; ++e) {
    std::snprintf(buf, sizeof buf, "adpop_errors_total{reason=\"%s\"} %llu\n",
                  error_reason_name(static_cast<ErrorReason>(e)),
                  static_cast<unsigned long long>(totals.errors[e]));
    out += buf;
  }
  for (int c = 0; c < kCounts; ++c) {
    const CountSpec& spec = kCountSpecs[c];
    if (c == 0 || std::string_view(spec.metric) != kCountSpecs[c - 1].metric)
      family(out, spec.metric, spec.type, spec.help);
    const bool labelled = spec.labels[0] != '\0';
    out += spec.metric;
    if (labelled) {
      out += '{';
      out += spec.labels;
      out += '}';
    }
    if (spec.scale == 1)
      std::snprintf(buf, sizeof buf, " %llu\n", static_cast<unsigned long long>(totals.counts[c]));
    else
      std::snprintf(buf, sizeof buf, " %.9f\n", static_cast<double>(totals.counts[c]) * spec.scale);
    out += buf;
  }
  latency_metrics(out, totals);
}

}  // namespace adpop
