#include "index.hpp"

#include <algorithm>
#include <cstring>

namespace adpop {

namespace {

constexpr std::uint64_t kEnd = ~std::uint64_t{0};

// Position of the posting list for (attribute, ordinal) in a bucket, or -1.
std::int64_t find_list(capnp::List<PostingList>::Reader lists, std::uint32_t attribute,
                       std::uint32_t ordinal) {
  const std::uint64_t key = (std::uint64_t{attribute} << 32) | ordinal;
  std::uint32_t lo = 0, hi = lists.size();
  while (lo < hi) {
    std::uint32_t mid = lo + (hi - lo) / 2;
    auto l = lists[mid];
    std::uint64_t k = (std::uint64_t{l.getAttribute()} << 32) | l.getValue();
    if (k < key)
      lo = mid + 1;
    else
      hi = mid;
  }
  if (lo < lists.size()) {
    auto l = lists[lo];
    if (l.getAttribute() == attribute && l.getValue() == ordinal) return lo;
  }
  return -1;
}

}  // namespace

void Matcher::refresh(Cursor& c) {
  std::uint64_t best = kEnd;
  for (std::uint32_t i = 0; i < c.n_subs; ++i) {
    const Sub& s = subs_[c.first_sub + i];
    if (s.pos < s.entries.size()) best = std::min<std::uint64_t>(best, s.entries[s.pos]);
  }
  c.current = best;
}

void Matcher::skip_to(Cursor& c, std::uint64_t conj) {
  const std::uint64_t target = conj << 1;  // the NOT IN entry of `conj` sorts first
  for (std::uint32_t i = 0; i < c.n_subs; ++i) {
    Sub& s = subs_[c.first_sub + i];
    std::uint32_t lo = s.pos, hi = s.entries.size();
    // Galloping would help very long lists; a plain lower bound is enough at these sizes.
    while (lo < hi) {
      std::uint32_t mid = lo + (hi - lo) / 2;
      if (s.entries[mid] < target)
        lo = mid + 1;
      else
        hi = mid;
    }
    s.pos = lo;
  }
  refresh(c);
}

void Matcher::walk(std::size_t k, std::vector<std::uint32_t>& out) {
  order_.clear();
  for (auto& c : cursors_) order_.push_back(&c);
  auto by_current = [](const Cursor* a, const Cursor* b) { return a->current < b->current; };
  while (true) {
    std::sort(order_.begin(), order_.end(), by_current);
    const std::uint64_t kth = order_[k - 1]->current;
    if (kth == kEnd) return;
    const std::uint64_t first = order_[0]->current;
    std::uint64_t next;
    if ((first >> 1) == (kth >> 1)) {
      const std::uint64_t conj = first >> 1;
      if (first & 1) {
        out.push_back(static_cast<std::uint32_t>(conj));
      } else {
        // Rejected by a NOT IN: also move cursors past K that sit on it.
        for (std::size_t i = k; i < order_.size(); ++i) {
          if ((order_[i]->current >> 1) == conj)
            skip_to(*order_[i], conj + 1);
          else
            break;
        }
      }
      next = conj + 1;
    } else {
      next = kth >> 1;
    }
    for (std::size_t i = 0; i < k; ++i) skip_to(*order_[i], next);
  }
}

void Matcher::match_conjunctions(const Snapshot& snap, const TargetingRequest& request,
                                 std::vector<std::uint32_t>& out) {
  out.clear();
  const auto index = snap.payload().getIndex();
  for (std::size_t a = 0; a < kAttributes; ++a) {
    ordinals_[a].clear();
    for (std::string_view v : request.values[a]) {
      std::int64_t ord = snap.attribute(a).find(v);
      if (ord >= 0) ordinals_[a].push_back(static_cast<std::uint32_t>(ord));
    }
  }
  const auto buckets = index.getBuckets();
  for (std::int64_t k = static_cast<std::int64_t>(buckets.size()) - 1; k >= 0; --k) {
    const auto lists = buckets[static_cast<std::uint32_t>(k)].getLists();
    subs_.clear();
    cursors_.clear();
    for (std::size_t a = 0; a < kAttributes; ++a) {
      Cursor c;
      c.first_sub = static_cast<std::uint32_t>(subs_.size());
      for (std::uint32_t ord : ordinals_[a]) {
        std::int64_t pos = find_list(lists, static_cast<std::uint32_t>(a), ord);
        if (pos >= 0) subs_.push_back(Sub{lists[static_cast<std::uint32_t>(pos)].getEntries(), 0});
      }
      c.n_subs = static_cast<std::uint32_t>(subs_.size()) - c.first_sub;
      if (c.n_subs > 0) cursors_.push_back(c);
    }
    if (k == 0 && index.getZeroEntries().size() > 0) {
      Cursor c;
      c.first_sub = static_cast<std::uint32_t>(subs_.size());
      subs_.push_back(Sub{index.getZeroEntries(), 0});
      c.n_subs = 1;
      cursors_.push_back(c);
    }
    const std::size_t need = k == 0 ? 1 : static_cast<std::size_t>(k);
    if (cursors_.size() < need) continue;
    // subs_ is complete now: no reallocation can move it under the cursors below.
    for (auto& c : cursors_) refresh(c);
    walk(need, out);
  }
}

void Matcher::match_campaigns(const Snapshot& snap, const TargetingRequest& request,
                              std::vector<std::uint32_t>& out) {
  match_conjunctions(snap, request, conj_scratch_);
  out.clear();
  const auto index = snap.payload().getIndex();
  const auto conjunctions = index.getConjunctions();
  const auto owners = index.getConjunctionCampaigns();
  for (std::uint32_t conj : conj_scratch_) {
    const auto c = conjunctions[conj];
    for (std::uint32_t i = 0; i < c.getCampaignsCount(); ++i)
      out.push_back(owners[c.getCampaignsStart() + i]);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
}

}  // namespace adpop
