#include "decide.hpp"

#include "spool.hpp"

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <limits>

namespace adpop {

namespace {

// splitmix64: a tiny, well-mixed generator; seeded per request so decisions replay exactly.
struct Rng {
  std::uint64_t state;
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  // Multiply-shift instead of a modulo: a 64-bit division costs tens of cycles per draw, and
  // the bias either way is below n / 2^64.
  std::uint64_t below(std::uint64_t n) {
    return static_cast<std::uint64_t>((static_cast<unsigned __int128>(next()) * n) >> 64);
  }
};

// The sizes a slot takes: the placement's, narrowed by the request's when it names any.
struct SlotSizes {
  AdSize sizes[32];
  std::size_t count = 0;

  SlotSizes(Placement::Reader placement, const PlacementRequest& request) {
    for (auto s : placement.getSizes()) {
      const AdSize size{s.getWidth(), s.getHeight()};
      const bool wanted = request.sizes.empty() ||
                          std::find(request.sizes.begin(), request.sizes.end(), size) != request.sizes.end();
      if (wanted && count < 32) sizes[count++] = size;
    }
  }
  bool fits(Ad::Reader ad) const {
    const AdSize size{ad.getWidth(), ad.getHeight()};
    return std::find(sizes, sizes + count, size) != sizes + count;
  }
};

// Competitive exclusion: a label taken by another campaign in this answer blocks `campaign`.
// Its own labels never block the campaign itself.
bool labels_conflict(std::uint32_t campaign, capnp::List<std::uint32_t>::Reader labels,
                     const std::vector<std::pair<std::uint32_t, std::uint32_t>>& taken) {
  for (auto label : labels)
    for (const auto& [l, owner] : taken)
      if (l == label && owner != campaign) return true;
  return false;
}

}  // namespace

const char* loss_name(LossReason reason) {
  switch (reason) {
    case LossReason::kFlight:
      return "flight";
    case LossReason::kSize:
      return "size";
    case LossReason::kCap:
      return "cap";
    case LossReason::kPacing:
      return "pacing";
    case LossReason::kTier:
      return "tier";
    case LossReason::kLottery:
      return "lottery";
    case LossReason::kExclusion:
      return "exclusion";
    case LossReason::kDuplicate:
      return "duplicate";
  }
  return "unknown";
}

std::uint32_t hour_of_week(std::int64_t t) {
  std::int64_t days = t >= 0 ? t / 86400 : (t - 86399) / 86400;
  std::int64_t hour = (t - days * 86400) / 3600;
  std::int64_t weekday = ((days + 3) % 7 + 7) % 7;  // 1970-01-01: Thursday = 3
  return static_cast<std::uint32_t>(weekday * 24 + hour);
}

bool Decider::capped(const Snapshot& snap, std::uint32_t campaign, std::int64_t t) const {
  const auto camp = snap.campaigns()[campaign];
  for (auto cap : camp.getCaps()) {
    const bool advertiser = cap.getScope() == CapScope::ADVERTISER;
    const std::uint32_t id =
        advertiser ? snap.advertisers()[camp.getAdvertiser()].getIdHash() : camp.getIdHash();
    for (const CapEntry& e : caps_) {
      if (e.scope == (advertiser ? 1 : 0) && e.id == id && e.window == cap.getWindowSeconds() &&
          t < std::int64_t{e.start} + e.window && e.count >= cap.getCount())
        return true;
    }
  }
  return false;
}

bool Decider::counts_caps(const Snapshot& snap, std::uint32_t campaign) {
  const auto camp = snap.campaigns()[campaign];
  return camp.getCaps().size() > 0 || snap.advertisers()[camp.getAdvertiser()].getCapWindows().size() > 0;
}

void Decider::count_cap(const Snapshot& snap, std::uint32_t campaign, std::int64_t t) {
  const auto camp = snap.campaigns()[campaign];
  const auto adv = snap.advertisers()[camp.getAdvertiser()];
  auto bump = [&](bool advertiser, std::uint32_t window) {
    const std::uint32_t id = advertiser ? adv.getIdHash() : camp.getIdHash();
    CapEntry* found = nullptr;
    for (CapEntry& e : caps_)
      if (e.scope == (advertiser ? 1 : 0) && e.id == id && e.window == window) found = &e;
    if (!found) {
      caps_.push_back(CapEntry{static_cast<std::uint8_t>(advertiser ? 1 : 0), id, window,
                               static_cast<std::uint32_t>(t), 0});
      found = &caps_.back();
    }
    if (t >= std::int64_t{found->start} + found->window) {
      found->start = static_cast<std::uint32_t>(t);
      found->count = 0;
    }
    if (found->count < 0xFFFF) ++found->count;
  };
  // An advertiser cap counts every impression of the advertiser, whichever of its campaigns
  // (capped or not) served it: the payload lists the advertiser's cap windows once.
  const auto windows = adv.getCapWindows();
  for (std::uint32_t window : windows) bump(true, window);
  for (auto cap : camp.getCaps()) {
    const bool advertiser = cap.getScope() == CapScope::ADVERTISER;
    // A payload from before capWindows: the campaign's own advertiser caps, as then.
    if (!advertiser || windows.size() == 0) bump(advertiser, cap.getWindowSeconds());
  }
}

// The snapshot's pass-through share first (the origin's forecast), then the PoP's allowance.
PaceResult Decider::pace(Campaign::Reader camp, const DecideContext& context, std::uint64_t roll) {
  if (camp.getPassThroughPpm() < 1000000 && roll % 1000000 >= camp.getPassThroughPpm())
    return PaceResult::kThrottled;
  if (camp.getBudgetDailyMicros() == 0 && camp.getBudgetTotalMicros() == 0) return PaceResult::kPass;
  if (!context.pacer) return PaceResult::kNoAllowance;
  // A second, independent roll: the first one decided the snapshot's share.
  return context.pacer->admit(camp.getIdHash(), camp.getEcpmMicros() / 1000, context.now_ms,
                              roll * 0x9E3779B97F4A7C15ULL >> 11);
}

namespace {
// Weighted draws per slot before falling back to checking the whole tier. A draw costs about
// one targeting check, so this bounds the sampling cost near the fallback's for small tiers.
constexpr int kMaxDraws = 64;
}  // namespace

void Decider::prepare_ordinals(const Snapshot& snap) {
  for (std::size_t a = 0; a < kAttributes; ++a) {
    ords_[a].clear();
    const AttributeView& values = snap.attribute(a);
    for (std::string_view v : targeting_.values[a]) {
      std::int64_t o = values.find(v);
      if (o >= 0) ords_[a].push_back(static_cast<std::uint32_t>(o));
    }
    std::sort(ords_[a].begin(), ords_[a].end());
  }
}

const LiveTier& Decider::live(const Snapshot& snap, const TierView& tier, std::int64_t t) {
  if (live_serial_ != snap.serial()) {
    live_.clear();  // another snapshot: its tiers are other memory
    live_serial_ = snap.serial();
  }
  LiveTier& lt = live_[&tier];
  if (t >= lt.from && t < lt.until) return lt;
  // Rebuilt when time crosses a flight start or end in this tier (or a replay asks for another
  // time): one pass that also finds the window the result holds for.
  lt.members.clear();
  lt.cumulative.clear();
  lt.from = std::numeric_limits<std::int64_t>::min();
  lt.until = std::numeric_limits<std::int64_t>::max();
  std::uint64_t total = 0;
  for (std::uint32_t m = 0; m < tier.size; ++m) {
    const std::uint32_t c = tier.members[m];
    const std::int64_t start = snap.campaign_start(c), end = snap.campaign_end(c);
    if (t < start) {
      lt.until = std::min(lt.until, start);
    } else if (t >= end) {
      lt.from = std::max(lt.from, end);
    } else {
      lt.from = std::max(lt.from, start);
      lt.until = std::min(lt.until, end);
      total += tier.cumulative[m] - (m ? tier.cumulative[m - 1] : 0);
      lt.members.push_back(c);
      lt.cumulative.push_back(total);
    }
  }
  return lt;
}

bool Decider::targets(const Snapshot& snap, std::uint32_t campaign) const {
  const auto camp = snap.campaigns()[campaign];
  const U32Span program = snap.program();
  const U32Span starts = snap.conjunction_program();
  const U32Span owned = snap.campaign_conjunctions();
  const std::uint32_t end = camp.getConjunctionsStart() + camp.getConjunctionsCount();
  for (std::uint32_t i = camp.getConjunctionsStart(); i < end; ++i) {
    const std::uint32_t* p = program.data + starts[owned[i]];
    const std::uint32_t n = *p++;
    bool holds = true;
    for (std::uint32_t k = 0; k < n; ++k) {
      const std::uint32_t attribute = p[0] >> 1;
      const bool negated = p[0] & 1;
      const std::uint32_t count = p[1];
      const std::uint32_t* values = p + 2;
      p = values + count;
      if (!holds) continue;  // walk past the remaining predicates' values
      bool hit = false;
      for (std::uint32_t o : ords_[attribute]) {
        if (std::binary_search(values, values + count, o)) {
          hit = true;
          break;
        }
      }
      if (hit == negated) holds = false;
    }
    if (holds) return true;
  }
  return false;
}

void Decider::decide(const Snapshot& snap, const DecideRequest& request, std::int64_t now, Decision& out,
                     const DecideContext& context) {
  const auto campaigns = snap.campaigns();
  const auto ads = snap.ads();
  const auto placements = snap.placements();
  const std::int64_t t = request.time >= 0 ? request.time : now;
  out.time = t;
  out.hour_of_week = hour_of_week(t);
  *std::to_chars(hour_text_, hour_text_ + sizeof hour_text_ - 1, out.hour_of_week).ptr = '\0';
  out.placements.resize(request.placements.size());

  targeting_.clear();
  auto set1 = [&](Attribute a, std::string_view v) {
    if (!v.empty()) targeting_.values[a].push_back(v);
  };
  set1(kCountry, request.country);
  set1(kRegion, request.region);
  set1(kDevice, request.device);
  set1(kOs, request.os);
  set1(kDomain, request.domain);
  set1(kHour, hour_text_);
  for (auto k : request.keywords) targeting_.values[kKeyword].push_back(k);
  for (auto s : request.segments) targeting_.values[kSegment].push_back(s);
  prepare_ordinals(snap);

  used_ads_.clear();
  exclusions_.clear();
  Rng rng{request_hash(request.id) ^ (snap.version() * 0x9E3779B97F4A7C15ULL)};
  const std::uint64_t user = request_hash(request.user_key);
  out.caps.clear();
  out.caps_rejected = false;
  caps_.clear();
  if (context.signer && context.signer->usable() && !request.caps.empty() &&
      !decode_caps(*context.signer, request.caps, user, caps_scratch_, caps_))
    out.caps_rejected = true;
  if (request.caps.empty() && context.user_caps) caps_ = *context.user_caps;
  bool caps_changed = false;

  for (std::size_t pi = 0; pi < request.placements.size(); ++pi) {
    const PlacementRequest& preq = request.placements[pi];
    PlacementDecision& pd = out.placements[pi];
    pd.chosen.clear();
    pd.eligible.clear();
    pd.losses.clear();
    paced_.clear();
    pd.placement = find_by_id(snap, placements, preq.id);
    if (pd.placement < 0) continue;
    const auto placement = placements[static_cast<std::uint32_t>(pd.placement)];

    const SlotSizes slot(placement, preq);
    auto fits = [&](std::uint32_t ad) { return slot.fits(ads[ad]); };
    auto unused_fitting_ad = [&](std::uint32_t c) {
      const auto camp = campaigns[c];
      for (std::uint32_t a = camp.getAdsStart(); a < camp.getAdsStart() + camp.getAdsCount(); ++a)
        if (fits(a) && std::find(used_ads_.begin(), used_ads_.end(), a) == used_ads_.end()) return true;
      return false;
    };
    auto chosen_here = [&](std::uint32_t c) {
      for (const Choice& ch : pd.chosen)
        if (ch.campaign == c) return true;
      return false;
    };
    // The placement is an attribute like any other; its ordinal joins the request's.
    targeting_.values[kPlacement].clear();
    targeting_.values[kPlacement].push_back(preq.id);
    ords_[kPlacement].clear();
    if (std::int64_t o = snap.attribute(kPlacement).find(preq.id); o >= 0)
      ords_[kPlacement].push_back(static_cast<std::uint32_t>(o));

    // Cheapest checks first; targeting is checked directly on the campaign's conjunctions.
    auto can_serve = [&](std::uint32_t c) {
      if (chosen_here(c)) return false;
      if (!targets(snap, c)) return false;
      const auto camp = campaigns[c];
      if (!unused_fitting_ad(c)) return false;
      // Labels can only conflict once a chosen campaign took some, and caps only bind when
      // the user's token counts something: both lists stay unread otherwise.
      if (!exclusions_.empty() && labels_conflict(c, camp.getExclusionLabels(), exclusions_)) return false;
      if (!caps_.empty() && capped(snap, c, t)) return false;
      if (const PaceResult paced = pace(camp, context, rng.next()); paced != PaceResult::kPass) {
        // The roll is not repeatable outside this walk: explain reads what it said here.
        if (request.explain) paced_.emplace_back(c, paced);
        return false;
      }
      return true;
    };
    auto choose = [&](std::uint32_t c) {
      const auto camp = campaigns[c];
      std::uint64_t ad_total = 0;
      for (std::uint32_t a = camp.getAdsStart(); a < camp.getAdsStart() + camp.getAdsCount(); ++a)
        if (fits(a) && std::find(used_ads_.begin(), used_ads_.end(), a) == used_ads_.end())
          ad_total += ads[a].getWeight();
      std::uint64_t ra = rng.below(ad_total);
      std::uint32_t chosen_ad = camp.getAdsStart();
      for (std::uint32_t a = camp.getAdsStart(); a < camp.getAdsStart() + camp.getAdsCount(); ++a) {
        if (!fits(a) || std::find(used_ads_.begin(), used_ads_.end(), a) != used_ads_.end()) continue;
        chosen_ad = a;
        std::uint64_t w = ads[a].getWeight();
        if (ra < w) break;
        ra -= w;
      }
      pd.chosen.push_back({chosen_ad, c, ads[chosen_ad].getCreative()});
      used_ads_.push_back(chosen_ad);
      // Competitive exclusion holds across the whole answer, placements included.
      for (auto label : camp.getExclusionLabels()) exclusions_.emplace_back(label, c);
      if (counts_caps(snap, c)) {
        count_cap(snap, c, t);
        caps_changed = true;
      }
      if ((camp.getBudgetDailyMicros() > 0 || camp.getBudgetTotalMicros() > 0) && context.pacer)
        context.pacer->reserve(camp.getIdHash(), camp.getEcpmMicros() / 1000, context.now_ms);
    };

    const std::uint32_t want =
        std::min<std::uint32_t>(std::max<std::uint32_t>(preq.count, 1), kMaxAdsPerPlacement);
    // Strict priority: tiers best first. Within a tier, a weighted draw over every campaign
    // that can ever serve here, kept if it can serve this request: exactly the weighted
    // lottery among the eligible ones, found in a few draws when many are eligible. After
    // kMaxDraws misses the tier is checked whole, which also proves it empty.
    // The request's country picks the partition (0: no country, or one no campaign names).
    const std::uint32_t part = ords_[kCountry].empty() ? 0 : ords_[kCountry][0] + 1;
    if (part >= snap.partitions()) continue;
    // Partition 0 (campaigns for any country) and the request country's partition are drawn
    // from together, tier by tier; a campaign is in one of them, never both.
    const std::vector<TierView>& any = snap.tiers(static_cast<std::uint32_t>(pd.placement), 0);
    static const std::vector<TierView> kNone;
    const std::vector<TierView>& own =
        part ? snap.tiers(static_cast<std::uint32_t>(pd.placement), part) : kNone;
    std::size_t ia = 0, io = 0;
    while (pd.chosen.size() < want && (ia < any.size() || io < own.size())) {
      const unsigned pa = ia < any.size() ? any[ia].priority : 256u;
      const unsigned po = io < own.size() ? own[io].priority : 256u;
      const unsigned priority = std::min(pa, po);
      // Draws go to the campaigns in flight now: most of a tier is not, at any one time.
      const LiveTier* lists[2] = {pa == priority ? &live(snap, any[ia++], t) : nullptr,
                                  po == priority ? &live(snap, own[io++], t) : nullptr};
      std::uint64_t totals[2] = {0, 0};
      std::uint32_t size = 0;
      for (int l = 0; l < 2; ++l)
        if (lists[l] && !lists[l]->members.empty()) {
          totals[l] = lists[l]->cumulative.back();
          size += static_cast<std::uint32_t>(lists[l]->members.size());
        }
      const std::uint64_t total = totals[0] + totals[1];
      if (size == 0) continue;
      // A small tier is cheaper to check whole than to sample: draws are for big ones.
      const int draws = static_cast<int>(std::min<std::uint32_t>(kMaxDraws, size / 2));
      bool exhaustive = draws < 4;
      while (pd.chosen.size() < want) {
        std::int64_t pick = -1;
        if (!exhaustive && total > 0) {
          for (int d = 0; d < draws && pick < 0; ++d) {
            std::uint64_t r = rng.below(total);
            const LiveTier* tier = lists[0];
            if (r >= totals[0]) {
              r -= totals[0];
              tier = lists[1];
            }
            const auto at = std::upper_bound(tier->cumulative.begin(), tier->cumulative.end(), r);
            const std::uint32_t c = tier->members[static_cast<std::size_t>(at - tier->cumulative.begin())];
            if (can_serve(c)) pick = c;
          }
          if (pick < 0) exhaustive = true;
        }
        if (pick < 0) {
          pool_.clear();
          std::uint64_t pool_weight = 0;
          for (const LiveTier* tier : lists) {
            if (!tier) continue;
            for (const std::uint32_t c : tier->members)
              if (can_serve(c)) {
                pool_.push_back(c);
                pool_weight += campaigns[c].getWeight();
              }
          }
          if (pool_.empty()) break;
          std::uint64_t r = rng.below(pool_weight);
          for (std::uint32_t c : pool_) {
            pick = c;
            const std::uint64_t w = campaigns[c].getWeight();
            if (r < w) break;
            r -= w;
          }
        }
        choose(static_cast<std::uint32_t>(pick));
      }
    }

    if (request.explain) explain(snap, request, pi, t, out);
  }
  out.caps_counted = caps_changed;
  if (context.signer && context.signer->usable() && (caps_changed || !request.caps.empty()))
    encode_caps(*context.signer, user, caps_, out.caps, caps_scratch_);
}

// The exhaustive view for `explain`: every campaign the k-index says targeting admits, and
// for each that did not serve, why. The choice itself is the serving path's, unchanged.
void Decider::explain(const Snapshot& snap, const DecideRequest& request, std::size_t pi, std::int64_t t,
                      Decision& out) {
  const auto campaigns = snap.campaigns();
  const auto ads = snap.ads();
  PlacementDecision& pd = out.placements[pi];
  const PlacementRequest& preq = request.placements[pi];
  const auto placement = snap.placements()[static_cast<std::uint32_t>(pd.placement)];
  const SlotSizes slot(placement, preq);
  auto fits = [&](std::uint32_t ad) { return slot.fits(ads[ad]); };
  matcher_.match_campaigns(snap, targeting_, matched_);
  std::uint8_t worst_chosen = 0;
  for (const Choice& ch : pd.chosen)
    worst_chosen = std::max<std::uint8_t>(worst_chosen, campaigns[ch.campaign].getPriority());
  for (std::uint32_t c : matched_) {
    const auto camp = campaigns[c];
    if (t < camp.getStart() || t >= camp.getEnd()) {
      pd.losses.push_back({c, LossReason::kFlight});
      continue;
    }
    bool any = false;
    for (std::uint32_t a = camp.getAdsStart(); a < camp.getAdsStart() + camp.getAdsCount(); ++a)
      any = any || fits(a);
    if (!any) {
      pd.losses.push_back({c, LossReason::kSize});
      continue;
    }
    pd.eligible.push_back(c);
    bool served = false;
    for (const Choice& ch : pd.chosen) served = served || ch.campaign == c;
    if (served) continue;
    bool unused = false;
    for (std::uint32_t a = camp.getAdsStart(); a < camp.getAdsStart() + camp.getAdsCount(); ++a)
      unused = unused || (fits(a) && std::find(used_ads_.begin(), used_ads_.end(), a) == used_ads_.end());
    LossReason reason = LossReason::kLottery;
    if (camp.getCaps().size() > 0 && capped(snap, c, t))
      reason = LossReason::kCap;
    else if (labels_conflict(c, camp.getExclusionLabels(), exclusions_))
      reason = LossReason::kExclusion;
    else if (!unused)
      reason = LossReason::kDuplicate;
    else if (!pd.chosen.empty() && camp.getPriority() > worst_chosen)
      reason = LossReason::kTier;
    PaceResult paced = PaceResult::kPass;
    for (const auto& [campaign, result] : paced_)
      if (campaign == c) paced = result;
    if (reason == LossReason::kLottery && paced != PaceResult::kPass)
      reason = LossReason::kPacing;  // the serving walk drew it and pacing held it back
    pd.losses.push_back({c, reason, paced});
  }
}

}  // namespace adpop
