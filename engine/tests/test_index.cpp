// The k-index walk against brute-force evaluation of the same conjunctions.
//
// The payload comes from the Python compiler (tests/test_engine_unit.py builds a synthetic
// one and passes its path in ADPOP_TEST_PAYLOAD). Brute force rebuilds each conjunction's
// IN / NOT IN value sets from the posting lists and evaluates them directly.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "index.hpp"
#include "snapshot.hpp"

namespace adpop {
namespace {

std::string payload_path() {
  const char* p = std::getenv("ADPOP_TEST_PAYLOAD");
  return p ? p : "";
}

struct Predicate {
  std::set<std::uint32_t> in, not_in;  // value ordinals
};
using Conj = std::map<std::uint32_t, Predicate>;  // attribute -> predicate

std::vector<Conj> rebuild(const Snapshot& snap) {
  auto index = snap.payload().getIndex();
  std::vector<Conj> conj(index.getConjunctions().size());
  for (auto bucket : index.getBuckets())
    for (auto list : bucket.getLists())
      for (auto e : list.getEntries()) {
        auto& p = conj[e >> 1][list.getAttribute()];
        (e & 1 ? p.in : p.not_in).insert(list.getValue());
      }
  return conj;
}

bool brute_match(const Conj& conj, const std::array<std::set<std::uint32_t>, kAttributes>& req) {
  for (const auto& [attribute, pred] : conj) {
    const auto& have = req[attribute];
    if (!pred.in.empty()) {
      bool hit = false;
      for (auto v : have) hit = hit || pred.in.count(v);
      if (!hit) return false;
    }
    for (auto v : have)
      if (pred.not_in.count(v)) return false;
  }
  return true;
}

class IndexTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(payload_path().empty()) << "set ADPOP_TEST_PAYLOAD to a compiled payload";
    std::string error;
    snap_ = Snapshot::open(payload_path(), false, &error);
    ASSERT_TRUE(snap_) << error;
  }
  std::unique_ptr<Snapshot> snap_;
};

TEST_F(IndexTest, RandomRequestsAgreeWithBruteForce) {
  auto conj = rebuild(*snap_);
  auto attributes = snap_->payload().getIndex().getAttributes();
  std::mt19937_64 rng(42);
  Matcher matcher;
  TargetingRequest request;
  std::vector<std::string> storage;
  std::vector<std::uint32_t> got;
  std::size_t matched = 0, multi = 0;
  for (int iteration = 0; iteration < 10000; ++iteration) {
    request.clear();
    storage.clear();
    storage.reserve(64);
    std::array<std::set<std::uint32_t>, kAttributes> ords;
    for (std::size_t a = 0; a < kAttributes; ++a) {
      auto values = attributes[a].getValues();
      if (values.size() == 0 || rng() % 100 < 15) continue;
      std::size_t count = (a == kKeyword || a == kSegment) ? 1 + rng() % 6 : 1;
      for (std::size_t i = 0; i < count; ++i) {
        if (rng() % 100 < 10) {
          storage.push_back("never-seen-" + std::to_string(rng() % 7));
        } else {
          std::uint32_t ord = static_cast<std::uint32_t>(rng() % values.size());
          storage.push_back(values[ord].cStr());
          ords[a].insert(ord);
        }
        request.values[a].push_back(storage.back());
      }
      if (count > 1) ++multi;
    }
    std::set<std::uint32_t> want;
    for (std::uint32_t c = 0; c < conj.size(); ++c)
      if (brute_match(conj[c], ords)) want.insert(c);
    matcher.match_conjunctions(*snap_, request, got);
    std::set<std::uint32_t> got_set(got.begin(), got.end());
    ASSERT_EQ(got_set.size(), got.size()) << "a conjunction was reported twice";
    ASSERT_EQ(got_set, want) << "request " << iteration;
    matched += want.size();
  }
  EXPECT_GT(matched, 10000u);
  EXPECT_GT(multi, 2000u);
}

TEST_F(IndexTest, CampaignsAreSortedAndUnique) {
  Matcher matcher;
  TargetingRequest request;  // no attributes: only K=0 conjunctions can match
  std::vector<std::uint32_t> campaigns;
  matcher.match_campaigns(*snap_, request, campaigns);
  EXPECT_TRUE(std::is_sorted(campaigns.begin(), campaigns.end()));
  EXPECT_EQ(std::adjacent_find(campaigns.begin(), campaigns.end()), campaigns.end());
  EXPECT_FALSE(campaigns.empty()) << "the synthetic set has untargeted campaigns";
}

TEST_F(IndexTest, CorruptPayloadsAreRefused) {
  std::ifstream in(payload_path(), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::mt19937_64 rng(7);
  int refused = 0;
  for (int i = 0; i < 200; ++i) {
    std::string copy = bytes;
    // Damage the first words, where the segment table and root pointers live.
    std::size_t at = rng() % std::min<std::size_t>(copy.size(), 256);
    copy[at] = static_cast<char>(copy[at] ^ (1 + rng() % 255));
    std::vector<capnp::word> words(copy.size() / sizeof(capnp::word));
    std::memcpy(words.data(), copy.data(), words.size() * sizeof(capnp::word));
    std::string error;
    auto snap = Snapshot::from_words(kj::arrayPtr(words.data(), words.size()), &error);
    if (!snap) {
      ++refused;
      EXPECT_FALSE(error.empty());
    }
  }
  EXPECT_GT(refused, 0);
}

TEST(SnapshotOpen, MissingFileIsOneLine) {
  std::string error;
  EXPECT_FALSE(Snapshot::open("/nonexistent/payload.capnp", false, &error));
  EXPECT_NE(error.find("cannot open"), std::string::npos);
}

}  // namespace
}  // namespace adpop
