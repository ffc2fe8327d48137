// A campaign snapshot payload mapped into memory and read in place.
//
// Opening validates once (Cap'n Proto structure with traversal and nesting limits, the schema
// id, and every cross-reference between tables) so the request path can index without checks.
#pragma once

#include <capnp/serialize.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "snapshot.capnp.h"

namespace adpop {

// Number of targeting attributes; the order is appliance/snapshot/model.py's ATTRIBUTES.
inline constexpr std::size_t kAttributes = 9;
inline constexpr const char* kAttributeNames[kAttributes] = {
    "country", "region", "device", "os", "domain", "placement", "keyword", "segment", "hour"};

enum Attribute : std::uint8_t {
  kCountry = 0,
  kRegion,
  kDevice,
  kOs,
  kDomain,
  kPlacement,
  kKeyword,
  kSegment,
  kHour
};

// Byte order of a payload string against a request value (the compiler sorts by bytes).
inline int compare_bytes(std::string_view a, std::string_view b) {
  return a < b ? -1 : (b < a ? 1 : 0);
}

// The schema id this engine was compiled against (the file id of snapshot.capnp).
std::uint64_t compiled_schema_id();

// Plain views of the flat lists the request path reads, taken once at open (a pointer and a
// length per list; nothing is copied or rebuilt). Valid while the Snapshot lives.
struct U32Span {
  const std::uint32_t* data = nullptr;
  std::uint32_t size = 0;
  std::uint32_t operator[](std::uint32_t i) const { return data[i]; }
};

struct TierView {
  std::uint8_t priority = 0;
  const std::uint32_t* members = nullptr;
  const std::uint64_t* cumulative = nullptr;
  std::uint32_t size = 0;
};

// The payload's packed string table: string i is blob[offsets[i], offsets[i + 1]).
struct StringTable {
  const char* blob = nullptr;
  const std::uint32_t* offsets = nullptr;
  std::uint32_t count = 0;
  std::string_view operator[](std::uint32_t i) const {
    return std::string_view(blob + offsets[i], offsets[i + 1] - offsets[i]);
  }
};

struct AttributeView {
  const char* blob = nullptr;
  const std::uint32_t* offsets = nullptr;
  const std::uint32_t* slots = nullptr;  // hash table: ordinal + 1, 0 empty
  std::uint32_t mask = 0;                // slots - 1
  std::uint32_t count = 0;
  std::string_view value(std::uint32_t i) const {
    return std::string_view(blob + offsets[i], offsets[i + 1] - offsets[i]);
  }
  // Ordinal of `v`, or -1.
  std::int64_t find(std::string_view v) const;
};

class Snapshot {
 public:
  // Maps `path` and validates it. On failure returns nullptr and sets `error` to one line.
  // With `hugepages`, copies the payload into huge-page-backed memory when the host has them.
  static std::unique_ptr<Snapshot> open(const std::string& path, bool hugepages, std::string* error);
  // Validates an in-memory payload (tests); `words` must stay alive as long as the snapshot.
  static std::unique_ptr<Snapshot> from_words(kj::ArrayPtr<const capnp::word> words, std::string* error);
  ~Snapshot();
  Snapshot(const Snapshot&) = delete;
  Snapshot& operator=(const Snapshot&) = delete;

  Payload::Reader payload() const { return root_; }
  std::uint64_t version() const { return root_.getVersion(); }
  std::size_t bytes() const { return size_; }
  bool on_hugepages() const { return hugepages_; }
  // The string at an interned index (validated in range at open).
  std::string_view str(std::uint32_t id) const { return strings_[id]; }

  // The tables, taken once at open: a list reader costs a library call to make.
  capnp::List<Campaign>::Reader campaigns() const { return campaigns_; }
  capnp::List<Ad>::Reader ads() const { return ads_; }
  capnp::List<Creative>::Reader creatives() const { return creatives_; }
  capnp::List<Advertiser>::Reader advertisers() const { return advertisers_; }
  capnp::List<Placement>::Reader placements() const { return placements_; }
  const AttributeView& attribute(std::size_t a) const { return attributes_[a]; }
  U32Span program() const { return program_; }
  U32Span conjunction_program() const { return conjunction_program_; }
  U32Span campaign_conjunctions() const { return campaign_conjunctions_; }
  std::int64_t campaign_start(std::uint32_t c) const { return campaign_starts_[c]; }
  std::int64_t campaign_end(std::uint32_t c) const { return campaign_ends_[c]; }
  std::uint32_t partitions() const { return partitions_; }
  // Unique per opened snapshot in this process (caches keyed on a snapshot use it: an
  // address can be reused once a snapshot is freed).
  std::uint64_t serial() const { return serial_; }
  // Tiers of a placement for a country partition, best first.
  const std::vector<TierView>& tiers(std::uint32_t placement, std::uint32_t partition) const {
    return tiers_[placement * partitions_ + partition];
  }

 private:
  Snapshot();
  bool attach(kj::ArrayPtr<const capnp::word> words, std::string* error);
  bool validate(std::string* error);
  bool validate_unchecked(std::string* error);

  void* map_ = nullptr;
  std::size_t map_size_ = 0;
  std::size_t size_ = 0;
  bool hugepages_ = false;
  std::unique_ptr<capnp::FlatArrayMessageReader> reader_;
  Payload::Reader root_;
  StringTable strings_;
  capnp::List<Campaign>::Reader campaigns_;
  capnp::List<Ad>::Reader ads_;
  capnp::List<Creative>::Reader creatives_;
  capnp::List<Advertiser>::Reader advertisers_;
  capnp::List<Placement>::Reader placements_;
  AttributeView attributes_[kAttributes];
  U32Span program_, conjunction_program_, campaign_conjunctions_;
  const std::int64_t* campaign_starts_ = nullptr;
  const std::int64_t* campaign_ends_ = nullptr;
  std::uint32_t partitions_ = 0;
  std::vector<std::vector<TierView>> tiers_;
  std::uint64_t serial_ = 0;
};

// Position of the element whose `id` string equals `id` in a list sorted by id bytes
// (placements, campaigns), or -1.
template <typename List>
std::int64_t find_by_id(const Snapshot& snap, List list, std::string_view id) {
  std::uint32_t lo = 0, hi = list.size();
  while (lo < hi) {
    const std::uint32_t mid = lo + (hi - lo) / 2;
    if (compare_bytes(snap.str(list[mid].getId()), id) < 0)
      lo = mid + 1;
    else
      hi = mid;
  }
  if (lo < list.size() && compare_bytes(snap.str(list[lo].getId()), id) == 0) return lo;
  return -1;
}

}  // namespace adpop
