// The /v1/decide wire format: request parsing (JSON body or flattened query) and the answer.
//
// JSON request:
//   {"id": "req-1",
//    "placements": [{"id": "home-top", "sizes": ["728x90"], "count": 1}],
//    "user": {"key": "u1", "segments": ["s1"]}, "device": {"type": "mobile", "os": "ios"},
//    "geo": {"country": "US", "region": "US-06"}, "site": {"domain": "news.example"},
//    "keywords": ["k1"], "time": 1767225600, "explain": false}
// Query form: id=..&placement=ID (repeatable)&sizes=300x250,728x90&count=N&user=..
//   &segments=a,b&device=..&os=..&country=..&region=..&domain=..&keywords=a,b&time=..
#pragma once

#include <string>
#include <string_view>
#include <unordered_map>

#include "decide.hpp"
#include "json.hpp"
#include "snapshot.hpp"
#include "token.hpp"

namespace adpop::api {

// Parses a JSON body in place; string views in `out` point into `body`.
bool parse_json(char* body, std::size_t size, json::Document& doc, DecideRequest& out, const char** error);
// Parses a query string; decoded text is written to `scratch` (resized to fit) and `out`
// points into it.
bool parse_query(std::string_view query, std::string& scratch, DecideRequest& out, const char** error);

// Signs the impression and click URLs of an answer.
struct TrackingLinks {
  const TokenSigner* signer = nullptr;
  std::uint32_t expires = 0;
};

// A shard's cache of each ad's fixed JSON fields (ids, size, priority, type, body or URL):
// the same in every answer from one snapshot, so each is rendered once. Bounded: past
// kMaxAds entries it starts over.
class AdFragments {
 public:
  static constexpr std::size_t kMaxAds = 1 << 16;
  std::string_view get(const Snapshot& snap, const Choice& choice);

 private:
  std::uint64_t serial_ = 0;
  std::unordered_map<std::uint32_t, std::string> by_ad_;
};

// Appends the JSON answer for `decision` to `out`; with `links`, each ad carries signed
// "imp" and "click" URLs. `fragments` (optional) caches the fixed part of each ad.
void render(const Snapshot& snap, const DecideRequest& request, const Decision& decision, std::string& out,
            const TrackingLinks* links = nullptr, AdFragments* fragments = nullptr);

void append_json_string(std::string& out, std::string_view s);

}  // namespace adpop::api
