// Targeting: walk the snapshot's k-index (Whang et al., VLDB 2009) in place.
//
// One cursor per ATTRIBUTE: a request's several values of one attribute (segments, keywords)
// merge into one cursor, so the attribute counts once toward a conjunction's size K, and a
// NOT IN entry on any of its values wins (NOT IN entries sort first for a conjunction).
// The same algorithm, in Python, is appliance/snapshot/index.py.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>
#include <vector>

#include "snapshot.hpp"

namespace adpop {

// What targeting sees of one request for one placement: per attribute, its values.
struct TargetingRequest {
  std::array<std::vector<std::string_view>, kAttributes> values;
  void clear() {
    for (auto& v : values) v.clear();
  }
};

// Reusable per shard: holds scratch space so matching allocates nothing once warm.
class Matcher {
 public:
  // Appends the ids of the conjunctions `request` satisfies to `out` (cleared first).
  void match_conjunctions(const Snapshot& snap, const TargetingRequest& request,
                          std::vector<std::uint32_t>& out);
  // Campaign indexes selected by targeting, sorted and unique.
  void match_campaigns(const Snapshot& snap, const TargetingRequest& request,
                       std::vector<std::uint32_t>& out);

 private:
  using Entries = capnp::List<std::uint32_t>::Reader;
  struct Cursor {
    std::uint32_t first_sub = 0;  // slice of subs_
    std::uint32_t n_subs = 0;
    std::uint64_t current = 0;  // smallest entry among subs, or kEnd
  };
  struct Sub {
    Entries entries;
    std::uint32_t pos = 0;
  };

  void refresh(Cursor& c);
  void skip_to(Cursor& c, std::uint64_t conj);
  void walk(std::size_t k, std::vector<std::uint32_t>& out);

  std::array<std::vector<std::uint32_t>, kAttributes> ordinals_;
  std::vector<Sub> subs_;
  std::vector<Cursor> cursors_;
  std::vector<Cursor*> order_;
  std::vector<std::uint32_t> conj_scratch_;
};

}  // namespace adpop
