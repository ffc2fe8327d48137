#include "decide.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace adpop {

namespace {

std::uint64_t fnv1a(std::string_view s) {
  std::uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

// splitmix64: a tiny, well-mixed generator; seeded per request so decisions replay exactly.
struct Rng {
  std::uint64_t state;
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  std::uint64_t below(std::uint64_t n) { return n ? next() % n : 0; }
};

int compare_text(kj::StringPtr a, std::string_view b) {
  std::size_t n = std::min<std::size_t>(a.size(), b.size());
  int c = n ? std::memcmp(a.begin(), b.data(), n) : 0;
  if (c != 0) return c;
  return a.size() < b.size() ? -1 : (a.size() > b.size() ? 1 : 0);
}

std::int64_t find_placement(const Snapshot& snap, std::string_view id) {
  const auto placements = snap.payload().getPlacements();
  std::uint32_t lo = 0, hi = placements.size();
  while (lo < hi) {
    std::uint32_t mid = lo + (hi - lo) / 2;
    if (compare_text(snap.str(placements[mid].getId()), id) < 0) lo = mid + 1;
    else hi = mid;
  }
  if (lo < placements.size() && compare_text(snap.str(placements[lo].getId()), id) == 0) return lo;
  return -1;
}

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
    case LossReason::kFlight: return "flight";
    case LossReason::kSize: return "size";
    case LossReason::kCap: return "cap";
    case LossReason::kPacing: return "pacing";
    case LossReason::kTier: return "tier";
    case LossReason::kLottery: return "lottery";
    case LossReason::kExclusion: return "exclusion";
    case LossReason::kDuplicate: return "duplicate";
  }
  return "unknown";
}

std::uint32_t hour_of_week(std::int64_t t) {
  std::int64_t days = t >= 0 ? t / 86400 : (t - 86399) / 86400;
  std::int64_t hour = (t - days * 86400) / 3600;
  std::int64_t weekday = ((days + 3) % 7 + 7) % 7;  // 1970-01-01: Thursday = 3
  return static_cast<std::uint32_t>(weekday * 24 + hour);
}

std::uint64_t Decider::spent(std::string_view campaign_id) const {
  auto it = spend_.find(id_hash(campaign_id));
  return it == spend_.end() ? 0 : it->second;
}

bool Decider::capped(const Snapshot& snap, std::uint32_t campaign, std::int64_t t) const {
  const auto camp = snap.payload().getCampaigns()[campaign];
  for (auto cap : camp.getCaps()) {
    const bool advertiser = cap.getScope() == CapScope::ADVERTISER;
    const std::uint32_t id = advertiser
        ? id_hash(snap.str(snap.payload().getAdvertisers()[camp.getAdvertiser()].getId()).cStr())
        : id_hash(snap.str(camp.getId()).cStr());
    for (const CapEntry& e : caps_) {
      if (e.scope == (advertiser ? 1 : 0) && e.id == id && e.window == cap.getWindowSeconds() &&
          t < std::int64_t{e.start} + e.window && e.count >= cap.getCount())
        return true;
    }
  }
  return false;
}

void Decider::count_cap(const Snapshot& snap, std::uint32_t campaign, std::int64_t t) {
  const auto camp = snap.payload().getCampaigns()[campaign];
  for (auto cap : camp.getCaps()) {
    const bool advertiser = cap.getScope() == CapScope::ADVERTISER;
    const std::uint32_t id = advertiser
        ? id_hash(snap.str(snap.payload().getAdvertisers()[camp.getAdvertiser()].getId()).cStr())
        : id_hash(snap.str(camp.getId()).cStr());
    CapEntry* found = nullptr;
    for (CapEntry& e : caps_)
      if (e.scope == (advertiser ? 1 : 0) && e.id == id && e.window == cap.getWindowSeconds()) found = &e;
    if (!found) {
      caps_.push_back(CapEntry{static_cast<std::uint8_t>(advertiser ? 1 : 0), id, cap.getWindowSeconds(),
                               static_cast<std::uint32_t>(t), 0});
      found = &caps_.back();
    }
    if (t >= std::int64_t{found->start} + found->window) {
      found->start = static_cast<std::uint32_t>(t);
      found->count = 0;
    }
    if (found->count < 0xFFFF) ++found->count;
  }
}

bool Decider::paced_out(const Snapshot& snap, std::uint32_t campaign, std::int64_t t,
                        const DecideContext& context, std::uint64_t roll) {
  const auto camp = snap.payload().getCampaigns()[campaign];
  if (camp.getPassThroughPpm() < 1000000 && roll % 1000000 >= camp.getPassThroughPpm()) return true;
  const std::uint64_t daily = camp.getBudgetDailyMicros();
  if (daily == 0) return false;
  const std::int64_t day = t / 86400;
  if (day != spend_day_) {
    spend_.clear();  // a new UTC day: budgets start over
    spend_day_ = day;
  }
  auto it = spend_.find(id_hash(snap.str(camp.getId()).cStr()));
  const std::uint64_t spent = it == spend_.end() ? 0 : it->second;
  const double frac = static_cast<double>(t - day * 86400) / 86400.0;
  double curve = 1.0;  // asap: the whole day's budget is available at once
  if (camp.getPacing() == Pacing::EVEN) curve = std::min(1.0, frac + 1.0 / 24);  // an hour of slack
  else if (camp.getPacing() == Pacing::FRONTLOADED) curve = std::min(1.0, frac * 1.5 + 1.0 / 12);
  const double allowed = static_cast<double>(daily) * context.budget_share /
                         std::max<std::uint32_t>(1, context.shards) * curve;
  return static_cast<double>(spent) >= allowed;
}

void Decider::decide(const Snapshot& snap, const DecideRequest& request, std::int64_t now,
                     Decision& out, const DecideContext& context) {
  const auto payload = snap.payload();
  const auto campaigns = payload.getCampaigns();
  const auto ads = payload.getAds();
  const auto creatives = payload.getCreatives();
  const auto placements = payload.getPlacements();
  const std::int64_t t = request.time >= 0 ? request.time : now;
  out.time = t;
  out.hour_of_week = hour_of_week(t);
  std::snprintf(hour_text_, sizeof hour_text_, "%u", out.hour_of_week);
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

  used_ads_.clear();
  exclusions_.clear();
  Rng rng{fnv1a(request.id) ^ (snap.version() * 0x9E3779B97F4A7C15ULL)};
  const std::uint64_t user = request_hash(request.user_key);
  out.caps.clear();
  out.caps_rejected = false;
  caps_.clear();
  if (context.signer && context.signer->usable() && !request.caps.empty() &&
      !decode_caps(*context.signer, request.caps, user, caps_scratch_, caps_))
    out.caps_rejected = true;
  bool caps_changed = false;

  for (std::size_t pi = 0; pi < request.placements.size(); ++pi) {
    const PlacementRequest& preq = request.placements[pi];
    PlacementDecision& pd = out.placements[pi];
    pd.chosen.clear();
    pd.eligible.clear();
    pd.losses.clear();
    pd.placement = find_placement(snap, preq.id);
    if (pd.placement < 0) continue;
    const auto placement = placements[static_cast<std::uint32_t>(pd.placement)];

    // Sizes this slot takes: the placement's, narrowed by the request's when it names any.
    AdSize allowed[32];
    std::size_t n_allowed = 0;
    for (auto s : placement.getSizes()) {
      AdSize size{s.getWidth(), s.getHeight()};
      bool wanted = preq.sizes.empty() ||
                    std::find(preq.sizes.begin(), preq.sizes.end(), size) != preq.sizes.end();
      if (wanted && n_allowed < 32) allowed[n_allowed++] = size;
    }
    auto fits = [&](std::uint32_t ad) {
      const auto cr = creatives[ads[ad].getCreative()];
      AdSize size{cr.getWidth(), cr.getHeight()};
      for (std::size_t i = 0; i < n_allowed; ++i)
        if (allowed[i] == size) return true;
      return false;
    };

    targeting_.values[kPlacement].clear();
    targeting_.values[kPlacement].push_back(preq.id);
    matcher_.match_campaigns(snap, targeting_, matched_);

    for (std::uint32_t c : matched_) {
      const auto camp = campaigns[c];
      if (t < camp.getStart() || t >= camp.getEnd()) {
        if (request.explain) pd.losses.push_back({c, LossReason::kFlight});
        continue;
      }
      bool any = false;
      for (std::uint32_t a = camp.getAdsStart(); a < camp.getAdsStart() + camp.getAdsCount(); ++a)
        if (fits(a)) {
          any = true;
          break;
        }
      if (!any) {
        if (request.explain) pd.losses.push_back({c, LossReason::kSize});
        continue;
      }
      pd.eligible.push_back(c);
    }
    // Caps and pacing decide who may compete; `eligible` keeps everyone who could have.
    biddable_.clear();
    for (std::uint32_t c : pd.eligible) {
      if (campaigns[c].getCaps().size() > 0 && capped(snap, c, t)) {
        if (request.explain) pd.losses.push_back({c, LossReason::kCap});
        continue;
      }
      if (paced_out(snap, c, t, context, rng.next())) {
        if (request.explain) pd.losses.push_back({c, LossReason::kPacing});
        continue;
      }
      biddable_.push_back(c);
    }
    // Strict priority: tier 1 before tier 2; within a tier, campaign index order is only the
    // starting point of a seeded weighted lottery.
    std::stable_sort(biddable_.begin(), biddable_.end(), [&](std::uint32_t a, std::uint32_t b) {
      return campaigns[a].getPriority() < campaigns[b].getPriority();
    });

    const std::uint32_t want = std::min<std::uint32_t>(std::max<std::uint32_t>(preq.count, 1),
                                                      kMaxAdsPerPlacement);
    std::vector<std::uint32_t>& pool = fitting_ads_;  // campaigns of the current tier
    std::size_t tier_start = 0;
    while (pd.chosen.size() < want && tier_start < biddable_.size()) {
      const std::uint8_t tier = campaigns[biddable_[tier_start]].getPriority();
      std::size_t tier_end = tier_start;
      while (tier_end < biddable_.size() && campaigns[biddable_[tier_end]].getPriority() == tier)
        ++tier_end;
      pool.assign(biddable_.begin() + static_cast<std::ptrdiff_t>(tier_start),
                  biddable_.begin() + static_cast<std::ptrdiff_t>(tier_end));
      while (pd.chosen.size() < want && !pool.empty()) {
        // Drop campaigns that can no longer serve: a competitor took their label, or every
        // ad that fits is already in this answer.
        std::uint64_t total = 0;
        for (std::size_t i = 0; i < pool.size();) {
          const auto camp = campaigns[pool[i]];
          bool blocked = labels_conflict(pool[i], camp.getExclusionLabels(), exclusions_);
          bool has_ad = false;
          for (std::uint32_t a = camp.getAdsStart(); a < camp.getAdsStart() + camp.getAdsCount(); ++a)
            if (fits(a) && std::find(used_ads_.begin(), used_ads_.end(), a) == used_ads_.end()) {
              has_ad = true;
              break;
            }
          if (blocked || !has_ad) {
            if (request.explain)
              pd.losses.push_back({pool[i], blocked ? LossReason::kExclusion : LossReason::kDuplicate});
            pool[i] = pool.back();
            pool.pop_back();
            continue;
          }
          total += camp.getWeight();
          ++i;
        }
        if (pool.empty()) break;
        // Pool order depends on removals above, which are deterministic too.
        std::sort(pool.begin(), pool.end());
        std::uint64_t r = rng.below(total);
        std::size_t pick = 0;
        for (; pick < pool.size(); ++pick) {
          std::uint64_t w = campaigns[pool[pick]].getWeight();
          if (r < w) break;
          r -= w;
        }
        if (pick == pool.size()) pick = pool.size() - 1;
        const std::uint32_t c = pool[pick];
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
        if (camp.getCaps().size() > 0) {
          count_cap(snap, c, t);
          caps_changed = true;
        }
        if (camp.getBudgetDailyMicros() > 0) spend_[id_hash(snap.str(camp.getId()).cStr())] += camp.getEcpmMicros() / 1000;
        // Competitive exclusion holds across the whole answer, placements included.
        for (auto label : camp.getExclusionLabels()) exclusions_.emplace_back(label, c);
        // One ad per campaign per placement; the campaign may still serve other placements.
        pool.erase(pool.begin() + static_cast<std::ptrdiff_t>(pick));
      }
      if (request.explain)
        for (std::uint32_t c : pool) pd.losses.push_back({c, LossReason::kLottery});
      tier_start = tier_end;
    }
    if (request.explain) {
      for (std::size_t i = tier_start; i < biddable_.size(); ++i)
        pd.losses.push_back({biddable_[i], LossReason::kTier});
    }
  }
  if (context.signer && context.signer->usable() && (caps_changed || !request.caps.empty()))
    encode_caps(*context.signer, user, caps_, out.caps);
}

}  // namespace adpop
