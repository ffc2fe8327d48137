// Ad decisions: targeting, flights, dayparts, sizes, then strict priority tiers and a seeded
// weighted lottery within a tier, with competitive exclusion and no duplicate ad.
//
// Deterministic: the same request id, snapshot and time give the same decision, so any
// decision can be replayed.
#pragma once

#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

#include "index.hpp"
#include "pacing.hpp"
#include "snapshot.hpp"
#include "token.hpp"

#include <array>
#include <string>
#include <unordered_map>

namespace adpop {

struct AdSize {
  std::uint16_t width = 0;
  std::uint16_t height = 0;
  bool operator==(const AdSize&) const = default;
};

struct PlacementRequest {
  std::string_view id;
  std::vector<AdSize> sizes;  // empty: every size the placement accepts
  std::uint32_t count = 1;    // 1..20 ads wanted
};

inline constexpr std::uint32_t kMaxAdsPerPlacement = 20;
inline constexpr std::size_t kMaxPlacements = 20;

struct DecideRequest {
  std::string_view id;
  std::vector<PlacementRequest> placements;
  std::string_view user_key;
  std::vector<std::string_view> segments;
  std::vector<std::string_view> keywords;
  std::string_view device;
  std::string_view os;
  std::string_view country;
  std::string_view region;
  std::string_view domain;
  std::int64_t time = -1;  // unix seconds; -1: the engine's clock
  bool explain = false;
  std::string_view caps;  // the frequency-cap token the client echoes back

  void clear() {
    id = user_key = device = os = country = region = domain = caps = {};
    placements.clear();
    segments.clear();
    keywords.clear();
    time = -1;
    explain = false;
  }
};

struct Choice {
  std::uint32_t ad = 0;
  std::uint32_t campaign = 0;
  std::uint32_t creative = 0;
};

// Why an eligible-by-targeting campaign did not serve, for `explain`.
enum class LossReason : std::uint8_t {
  kFlight,
  kSize,
  kCap,
  kPacing,  // with the pacing answer beside it (Loss::pacing)
  kTier,
  kLottery,
  kExclusion,
  kDuplicate
};
const char* loss_name(LossReason reason);

struct Loss {
  std::uint32_t campaign = 0;
  LossReason reason = LossReason::kFlight;
  PaceResult pacing = PaceResult::kPass;  // kPacing only: why
};

struct PlacementDecision {
  std::int64_t placement = -1;  // index in the snapshot, -1 if unknown
  std::vector<Choice> chosen;
  std::vector<std::uint32_t> eligible;  // campaigns passing targeting, flight and size
  std::vector<Loss> losses;             // explain only
};

struct Decision {
  std::vector<PlacementDecision> placements;
  std::int64_t time = 0;
  std::uint32_t hour_of_week = 0;
  std::string caps;            // the updated cap token for the client ("" when none)
  bool caps_rejected = false;  // a token was sent but was forged, malformed or another user's
  bool caps_counted = false;   // an ad served counted toward a cap (Decider::caps() changed)
};

// What a decision needs beyond the request: the token signer (caps) and the shard's pacer
// (budgeted campaigns; none: they do not serve) with the wall-clock time it paces by. Pacing
// runs on the engine's clock, never the request's `time`, so a client cannot step around an
// allowance's expiry.
struct DecideContext {
  const TokenSigner* signer = nullptr;
  ShardPacer* pacer = nullptr;
  std::int64_t now_ms = 0;
  // A request with a user key and no cap token: the user's counters from the PoP cache
  // (engine/CACHE.md), counted on as a token's would be.
  const std::vector<CapEntry>* user_caps = nullptr;
};

// Hour of week in UTC, Monday 00:00 = 0 (1970-01-01 was a Thursday).
std::uint32_t hour_of_week(std::int64_t unix_seconds);

// A tier narrowed to the campaigns in flight at one time, with their cumulative weights. It
// holds for every time in [from, until): flights change it only at their starts and ends.
struct LiveTier {
  std::int64_t from = 0;
  std::int64_t until = 0;  // from == until: never built
  std::vector<std::uint32_t> members;
  std::vector<std::uint64_t> cumulative;
};

class Decider {
 public:
  void decide(const Snapshot& snap, const DecideRequest& request, std::int64_t now, Decision& out,
              const DecideContext& context = {});
  // The user's cap counters after the last decision (what its token or cache entry holds).
  const std::vector<CapEntry>& caps() const { return caps_; }

 private:
  bool capped(const Snapshot& snap, std::uint32_t campaign, std::int64_t t) const;
  static bool counts_caps(const Snapshot& snap, std::uint32_t campaign);
  void count_cap(const Snapshot& snap, std::uint32_t campaign, std::int64_t t);
  static PaceResult pace(Campaign::Reader camp, const DecideContext& context, std::uint64_t roll);
  void prepare_ordinals(const Snapshot& snap);
  const LiveTier& live(const Snapshot& snap, const TierView& tier, std::int64_t t);
  bool targets(const Snapshot& snap, std::uint32_t campaign) const;
  void explain(const Snapshot& snap, const DecideRequest& request, std::size_t placement, std::int64_t t,
               Decision& out);

  std::vector<CapEntry> caps_;
  std::string caps_scratch_;

  Matcher matcher_;
  TargetingRequest targeting_;
  std::vector<std::uint32_t> matched_;
  std::array<std::vector<std::uint32_t>, kAttributes> ords_;  // request value ordinals, sorted
  std::vector<std::uint32_t> pool_;                           // a tier's servable campaigns (fallback path)
  // In-flight views of the tiers this shard has drawn from, for the snapshot `live_serial_`.
  std::unordered_map<const TierView*, LiveTier> live_;
  std::uint64_t live_serial_ = 0;
  std::vector<std::uint32_t> used_ads_;
  std::vector<std::pair<std::uint32_t, PaceResult>> paced_;  // explain only: held back in this placement
  std::vector<std::pair<std::uint32_t, std::uint32_t>> exclusions_;  // (label, campaign)
  char hour_text_[8] = {};
};

}  // namespace adpop
