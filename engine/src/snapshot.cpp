#include "snapshot.hpp"

#include "spool.hpp"

#include <capnp/any.h>
#include <capnp/schema.h>
#include <fcntl.h>
#include <kj/exception.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <limits>

namespace adpop {

std::int64_t AttributeView::find(std::string_view v) const {
  if (count == 0) return -1;
  // Open addressing over the compiler's table; it is at most half full, so probes are short
  // and an empty slot always ends the search.
  for (std::uint32_t at = crc32_ieee(v.data(), v.size()) & mask;; at = (at + 1) & mask) {
    const std::uint32_t slot = slots[at];
    if (slot == 0) return -1;
    if (value(slot - 1) == v) return slot - 1;
  }
}

std::uint64_t compiled_schema_id() {
  return capnp::Schema::from<Payload>().getProto().getScopeId();
}

namespace {

constexpr std::size_t kHugePage = 2u << 20;

template <typename T, typename List>
const T* raw(List list) {
  return reinterpret_cast<const T*>(capnp::AnyList::Reader(list).getRawBytes().begin());
}

bool fail(std::string* error, const std::string& message) {
  if (error) *error = message;
  return false;
}

}  // namespace

Snapshot::Snapshot() {
  static std::atomic<std::uint64_t> opened{0};
  serial_ = opened.fetch_add(1, std::memory_order_relaxed) + 1;
}

Snapshot::~Snapshot() {
  reader_.reset();
  if (map_ != nullptr) munmap(map_, map_size_);
}

std::unique_ptr<Snapshot> Snapshot::open(const std::string& path, bool hugepages, std::string* error) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    fail(error, "cannot open " + path + ": " + std::strerror(errno));
    return nullptr;
  }
  struct stat st {};
  if (fstat(fd, &st) != 0 || st.st_size <= 0 || st.st_size % sizeof(capnp::word) != 0) {
    ::close(fd);
    fail(error, path + " is empty or not a whole number of Cap'n Proto words");
    return nullptr;
  }
  std::unique_ptr<Snapshot> snap(new Snapshot());
  snap->size_ = static_cast<std::size_t>(st.st_size);
  if (hugepages) {
    // Huge pages cut TLB misses on the index walk; the payload is copied in once per swap.
    std::size_t rounded = (snap->size_ + kHugePage - 1) / kHugePage * kHugePage;
    void* mem =
        mmap(nullptr, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
    if (mem != MAP_FAILED) {
      std::size_t done = 0;
      while (done < snap->size_) {
        ssize_t n = pread(fd, static_cast<char*>(mem) + done, snap->size_ - done, static_cast<off_t>(done));
        if (n <= 0) break;
        done += static_cast<std::size_t>(n);
      }
      if (done == snap->size_) {
        mprotect(mem, rounded, PROT_READ);
        snap->map_ = mem;
        snap->map_size_ = rounded;
        snap->hugepages_ = true;
      } else {
        munmap(mem, rounded);
      }
    }
  }
  if (snap->map_ == nullptr) {
    void* mem = mmap(nullptr, snap->size_, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    if (mem == MAP_FAILED) {
      ::close(fd);
      fail(error, "cannot map " + path + ": " + std::strerror(errno));
      return nullptr;
    }
    snap->map_ = mem;
    snap->map_size_ = snap->size_;
  }
  ::close(fd);
  kj::ArrayPtr<const capnp::word> words(static_cast<const capnp::word*>(snap->map_),
                                        snap->size_ / sizeof(capnp::word));
  if (!snap->attach(words, error)) return nullptr;
  return snap;
}

std::unique_ptr<Snapshot> Snapshot::from_words(kj::ArrayPtr<const capnp::word> words, std::string* error) {
  std::unique_ptr<Snapshot> snap(new Snapshot());
  snap->size_ = words.size() * sizeof(capnp::word);
  if (!snap->attach(words, error)) return nullptr;
  return snap;
}

bool Snapshot::attach(kj::ArrayPtr<const capnp::word> words, std::string* error) {
  // Structural check with limits first, on a throwaway reader: a hostile payload cannot make
  // it loop (traversal limit) or recurse deeply (nesting limit).
  try {
    capnp::ReaderOptions checked;
    checked.traversalLimitInWords = words.size() * 2 + 1024;
    checked.nestingLimit = 16;
    capnp::FlatArrayMessageReader probe(words, checked);
    (void)probe.getRoot<Payload>().totalSize();
  } catch (const kj::Exception& e) {
    return fail(error, "payload structure invalid: " + std::string(e.getDescription().cStr()));
  }
  // The serving reader has no traversal budget: Cap'n Proto counts it across the reader's
  // whole life, and this one answers requests for as long as the snapshot is active.
  capnp::ReaderOptions serving;
  serving.traversalLimitInWords = std::numeric_limits<std::uint64_t>::max();
  serving.nestingLimit = 16;
  reader_ = std::make_unique<capnp::FlatArrayMessageReader>(words, serving);
  return validate(error);
}

// Every pointer and index the request path follows is read or checked here once, so a
// payload that passes cannot make the hot path throw or index out of range.
bool Snapshot::validate(std::string* error) {
  try {
    return validate_unchecked(error);
  } catch (const kj::Exception& e) {
    return fail(error, "payload invalid: " + std::string(e.getDescription().cStr()));
  }
}

bool Snapshot::validate_unchecked(std::string* error) {
  root_ = reader_->getRoot<Payload>();
  // One segment: the request path then never looks a segment up (a locked lookup in
  // libcapnp). The compiler always writes one; anything else was not made by it.
  if (reader_->getSegment(1) != nullptr)
    return fail(error, "payload has more than one segment; rebuild it with `adpop snapshot build`");
  if (root_.getSchemaId() != compiled_schema_id()) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "schema id %016llx, this engine reads %016llx",
                  static_cast<unsigned long long>(root_.getSchemaId()),
                  static_cast<unsigned long long>(compiled_schema_id()));
    return fail(error, buf);
  }
  const auto blob = root_.getStringBlob();
  const auto offsets = root_.getStringOffsets();
  if (offsets.size() < 2) return fail(error, "string table is empty");
  const std::uint32_t n_strings = offsets.size() - 1;
  // Offsets must rise and stay inside the blob, and string 0 must be "".
  for (std::uint32_t i = 0; i < n_strings; ++i)
    if (offsets[i] > offsets[i + 1]) return fail(error, "string offsets out of order");
  if (offsets[n_strings] > blob.size()) return fail(error, "string offsets past the string blob");
  if (offsets[0] != 0 || offsets[1] != 0) return fail(error, "string 0 is not empty");
  strings_ = StringTable{reinterpret_cast<const char*>(blob.begin()), raw<std::uint32_t>(offsets), n_strings};
  const auto advertisers = root_.getAdvertisers();
  const auto creatives = root_.getCreatives();
  const auto campaigns = root_.getCampaigns();
  const auto ads = root_.getAds();
  const auto placements = root_.getPlacements();
  const auto index = root_.getIndex();
  auto bad_string = [&](std::uint32_t id) { return id >= n_strings; };
  for (auto a : advertisers)
    if (bad_string(a.getId()) || bad_string(a.getName()))
      return fail(error, "advertiser string out of range");
  for (auto c : creatives) {
    if (c.getAdvertiser() >= advertisers.size()) return fail(error, "creative advertiser out of range");
    if (bad_string(c.getId()) || bad_string(c.getBody()) || bad_string(c.getUrl()) ||
        bad_string(c.getLandingUrl()))
      return fail(error, "creative string out of range");
  }
  for (auto c : campaigns) {
    if (c.getAdvertiser() >= advertisers.size()) return fail(error, "campaign advertiser out of range");
    if (bad_string(c.getId()) || bad_string(c.getName())) return fail(error, "campaign string out of range");
    if (std::uint64_t{c.getAdsStart()} + c.getAdsCount() > ads.size())
      return fail(error, "campaign ad slice out of range");
    for (auto label : c.getExclusionLabels())
      if (bad_string(label)) return fail(error, "exclusion label out of range");
    for (auto cap : c.getCaps())
      if (cap.getCount() == 0 || cap.getWindowSeconds() == 0) return fail(error, "empty frequency cap");
    // The PoP checks prices and budgets against its limits by these stats; hold them to it.
    if (c.getEcpmMicros() > root_.getStats().getMaxEcpmMicros() ||
        c.getBudgetDailyMicros() > root_.getStats().getMaxBudgetDailyMicros())
      return fail(error, "a campaign's eCPM or daily budget is above the payload's stats");
  }
  for (auto ad : ads) {
    if (ad.getCampaign() >= campaigns.size() || ad.getCreative() >= creatives.size() ||
        bad_string(ad.getId()))
      return fail(error, "ad reference out of range");
    const auto cr = creatives[ad.getCreative()];
    if (ad.getWidth() != cr.getWidth() || ad.getHeight() != cr.getHeight())
      return fail(error, "ad size disagrees with its creative");
  }
  const auto flight_starts = root_.getCampaignStarts();
  const auto flight_ends = root_.getCampaignEnds();
  if (flight_starts.size() != campaigns.size() || flight_ends.size() != campaigns.size())
    return fail(error, "flight columns do not match the campaigns");
  for (std::uint32_t i = 0; i < campaigns.size(); ++i)
    if (flight_starts[i] != campaigns[i].getStart() || flight_ends[i] != campaigns[i].getEnd())
      return fail(error, "flight columns disagree with the campaigns");
  campaign_starts_ = raw<std::int64_t>(flight_starts);
  campaign_ends_ = raw<std::int64_t>(flight_ends);
  for (auto p : placements) {
    if (bad_string(p.getId()) || bad_string(p.getZone())) return fail(error, "placement string out of range");
    for (auto size : p.getSizes()) (void)size.getWidth();
    for (auto ad : p.getCandidates())
      if (ad >= ads.size()) return fail(error, "placement candidate out of range");
  }
  const auto conjunctions = index.getConjunctions();
  const auto owners = index.getConjunctionCampaigns();
  if (index.getAttributes().size() != kAttributes)
    return fail(error, "index has " + std::to_string(index.getAttributes().size()) +
                           " attributes, this engine knows " + std::to_string(kAttributes));
  for (std::size_t a = 0; a < kAttributes; ++a) {
    const auto attribute = index.getAttributes()[a];
    if (attribute.getName() != kj::StringPtr(kAttributeNames[a]))
      return fail(error,
                  std::string("index attribute ") + std::to_string(a) + " is not " + kAttributeNames[a]);
    // Request values are found by binary search: the values must be strictly sorted.
    const auto values = attribute.getValues();
    for (std::uint32_t i = 1; i < values.size(); ++i)
      if (!(values[i - 1] < values[i]))
        return fail(error, std::string("values of ") + kAttributeNames[a] + " are not sorted");
  }
  for (auto c : conjunctions)
    if (std::uint64_t{c.getCampaignsStart()} + c.getCampaignsCount() > owners.size())
      return fail(error, "conjunction campaign slice out of range");
  // Packed attribute values: the binary search reads them as plain memory.
  for (std::size_t a = 0; a < kAttributes; ++a) {
    const auto attr = index.getAttributes()[a];
    const auto offsets = attr.getOffsets();
    const auto blob = attr.getBlob();
    if (offsets.size() != attr.getValues().size() + 1 || offsets[0] != 0 ||
        offsets[offsets.size() - 1] != blob.size())
      return fail(error, std::string("packed values of ") + kAttributeNames[a] + " do not match");
    for (std::uint32_t i = 1; i < offsets.size(); ++i)
      if (offsets[i] < offsets[i - 1]) return fail(error, "packed value offsets decrease");
    const auto slots = attr.getSlots();
    const std::uint32_t n = attr.getValues().size();
    if (slots.size() < 2 || (slots.size() & (slots.size() - 1)) != 0 || slots.size() < 2 * n)
      return fail(error, std::string("hash table of ") + kAttributeNames[a] +
                             " is not a power of two at least twice its values");
    std::uint32_t used = 0;
    for (auto s : slots) {
      if (s > n) return fail(error, "hash slot out of range");
      used += s != 0;
    }
    if (used != n) return fail(error, std::string("hash table of ") + kAttributeNames[a] + " misses values");
    attributes_[a] = AttributeView{reinterpret_cast<const char*>(blob.begin()), raw<std::uint32_t>(offsets),
                                   raw<std::uint32_t>(slots), slots.size() - 1, n};
    // Every value must be findable through the table (a bad table would hide targeting).
    for (std::uint32_t i = 0; i < n; ++i)
      if (attributes_[a].find(attributes_[a].value(i)) != i)
        return fail(error, std::string("hash table of ") + kAttributeNames[a] + " does not find its values");
  }
  // The conjunction program: every offset, count and ordinal is checked once here.
  const auto program = index.getProgram();
  const auto starts = index.getConjunctionProgram();
  const auto campaign_conjunctions = index.getCampaignConjunctions();
  if (starts.size() != conjunctions.size()) return fail(error, "conjunction program index size mismatch");
  program_ = U32Span{raw<std::uint32_t>(program), program.size()};
  conjunction_program_ = U32Span{raw<std::uint32_t>(starts), starts.size()};
  campaign_conjunctions_ = U32Span{raw<std::uint32_t>(campaign_conjunctions), campaign_conjunctions.size()};
  for (std::uint32_t c = 0; c < starts.size(); ++c) {
    std::uint64_t at = starts[c];
    if (at >= program.size()) return fail(error, "conjunction program offset out of range");
    std::uint32_t n = program_[static_cast<std::uint32_t>(at++)];
    for (std::uint32_t p = 0; p < n; ++p) {
      if (at + 2 > program.size()) return fail(error, "conjunction program truncated");
      std::uint32_t attribute = program_[static_cast<std::uint32_t>(at)] >> 1;
      std::uint32_t count = program_[static_cast<std::uint32_t>(at + 1)];
      at += 2;
      if (attribute >= kAttributes || at + count > program.size())
        return fail(error, "conjunction program predicate out of range");
      for (std::uint32_t v = 0; v < count; ++v) {
        std::uint32_t ordinal = program_[static_cast<std::uint32_t>(at + v)];
        if (ordinal >= attributes_[attribute].count ||
            (v > 0 && ordinal <= program_[static_cast<std::uint32_t>(at + v - 1)]))
          return fail(error, "conjunction program values unsorted or out of range");
      }
      at += count;
    }
  }
  for (auto cc : campaign_conjunctions)
    if (cc >= conjunctions.size()) return fail(error, "campaign conjunction out of range");
  for (auto c : campaigns)
    if (std::uint64_t{c.getConjunctionsStart()} + c.getConjunctionsCount() > campaign_conjunctions.size())
      return fail(error, "campaign conjunction slice out of range");
  const std::uint32_t partitions = index.getAttributes()[kCountry].getValues().size() + 1;
  partitions_ = partitions;
  campaigns_ = campaigns;
  ads_ = ads;
  creatives_ = creatives;
  advertisers_ = advertisers;
  placements_ = placements;
  tiers_.assign(std::size_t{placements.size()} * partitions, {});
  std::size_t slot = 0;
  for (auto p : placements) {
    if (p.getPartitions().size() != partitions)
      return fail(error, "placement has " + std::to_string(p.getPartitions().size()) +
                             " country partitions, expected " + std::to_string(partitions));
    for (auto part : p.getPartitions()) {
      for (auto tier : part.getTiers()) {
        const auto members = tier.getCampaigns();
        const auto cumulative = tier.getCumulativeWeights();
        if (members.size() != cumulative.size())
          return fail(error, "tier columns do not match its campaigns");
        for (std::uint32_t i = 0; i < members.size(); ++i) {
          if (members[i] >= campaigns.size() || campaigns[members[i]].getPriority() != tier.getPriority())
            return fail(error, "tier campaign out of range or of another priority");
          if (i > 0 && cumulative[i] < cumulative[i - 1]) return fail(error, "tier weights decrease");
        }
        tiers_[slot].push_back(TierView{tier.getPriority(), raw<std::uint32_t>(members),
                                        raw<std::uint64_t>(cumulative), members.size()});
      }
      ++slot;
    }
  }
  for (auto owner : owners)
    if (owner >= campaigns.size()) return fail(error, "conjunction campaign out of range");
  const std::uint64_t max_entry = std::uint64_t{conjunctions.size()} << 1;
  auto check_entries = [&](capnp::List<std::uint32_t>::Reader entries) {
    std::uint32_t prev = 0;
    for (std::uint32_t i = 0; i < entries.size(); ++i) {
      std::uint32_t e = entries[i];
      if (e >= max_entry || (i > 0 && e < prev)) return false;
      prev = e;
    }
    return true;
  };
  if (!check_entries(index.getZeroEntries())) return fail(error, "Z list unsorted or out of range");
  for (auto bucket : index.getBuckets()) {
    std::uint64_t prev_key = 0;
    bool first = true;
    for (auto list : bucket.getLists()) {
      if (list.getAttribute() >= kAttributes ||
          list.getValue() >= index.getAttributes()[list.getAttribute()].getValues().size())
        return fail(error, "posting list key out of range");
      std::uint64_t key = (std::uint64_t{list.getAttribute()} << 32) | list.getValue();
      if (!first && key <= prev_key) return fail(error, "posting lists not sorted");
      prev_key = key;
      first = false;
      if (!check_entries(list.getEntries())) return fail(error, "posting entries unsorted or out of range");
    }
  }
  return true;
}

}  // namespace adpop
