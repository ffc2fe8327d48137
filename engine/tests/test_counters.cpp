// The counter registry: every count declared once shows in both the status JSON and the
// Prometheus text, each family's HELP and TYPE come once, and nanoseconds render as seconds.
#include <gtest/gtest.h>

#include <string>
#include <string_view>

#include "counters.hpp"

namespace {

std::size_t occurrences(std::string_view text, std::string_view what) {
  std::size_t n = 0;
  for (std::size_t at = text.find(what); at != std::string_view::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

adpop::Totals numbered() {
  adpop::Totals totals;
  for (int c = 0; c < adpop::kCounts; ++c) totals.counts[c] = 1000 + static_cast<std::uint64_t>(c);
  return totals;
}

}  // namespace

TEST(Counters, EveryCountRendersInBothFormats) {
  const adpop::Totals totals = numbered();
  std::string metrics;
  adpop::append_counts_metrics(metrics, totals);
  for (int c = 0; c < adpop::kCounts; ++c) {
    const adpop::CountSpec& spec = adpop::kCountSpecs[c];
    std::string json;
    adpop::append_counts_json(json, totals, spec.group);
    EXPECT_NE(json.find("\"" + std::string(spec.key) + "\":" + std::to_string(1000 + c) + ","),
              std::string::npos)
        << spec.key;
    std::string sample(spec.metric);
    if (spec.labels[0] != '\0') sample += "{" + std::string(spec.labels) + "}";
    EXPECT_NE(metrics.find(sample + " "), std::string::npos) << sample;
    EXPECT_EQ(occurrences(metrics, "# HELP " + std::string(spec.metric) + " "), 1u) << spec.metric;
    EXPECT_EQ(occurrences(metrics, "# TYPE " + std::string(spec.metric) + " "), 1u) << spec.metric;
  }
  // Idle polling is counted in nanoseconds and exposed in seconds.
  adpop::Totals polled;
  polled.counts[adpop::kIdlePollNs] = 2'500'000'000;
  std::string scaled;
  adpop::append_counts_metrics(scaled, polled);
  EXPECT_NE(scaled.find("\nadpop_idle_poll_seconds_total 2.500000000\n"), std::string::npos) << scaled;
}

TEST(Counters, FamiliesAreAdjacentAndNamedOnTheirFirstRow) {
  for (int c = 0; c < adpop::kCounts; ++c) {
    const adpop::CountSpec& spec = adpop::kCountSpecs[c];
    const bool first = c == 0 || std::string_view(spec.metric) != adpop::kCountSpecs[c - 1].metric;
    if (first) {
      EXPECT_STRNE(spec.help, "") << spec.metric << " has no HELP on its first row";
      for (int d = 0; d < c; ++d)
        EXPECT_STRNE(adpop::kCountSpecs[d].metric, spec.metric) << spec.metric << " is split";
    }
  }
}

TEST(Counters, GroupsHoldOnlyTheirOwnKeys) {
  const adpop::Totals totals = numbered();
  std::string events;
  adpop::append_counts_json(events, totals, "events");
  EXPECT_EQ(events.find("no_fill"), std::string::npos);
  EXPECT_NE(events.find("\"clicks\":"), std::string::npos);
}
