// Signed tracking tokens for impression and click URLs: compact, HMAC-SHA256, expiring.
//
// Layout before base64url (no padding):
//   u8 kind | u32 expires (unix s, LE) | u64 request hash (LE) | u32 snapshot version (LE) |
//   u8 len + campaign id | u8 len + ad id | u8 len + placement id | 12-byte tag
// The tag is a slice of HMAC-SHA256 over the same bytes with the kind byte replaced by a
// tracking domain byte: bytes 0-11 for an impression, 12-23 for a click. So one MAC signs both
// of an ad's URLs, and as HMAC's output is a PRF one slice says nothing about the other: an
// impression URL that leaks cannot be turned into a click.
// Ids rather than table positions, so a token outlives a snapshot swap: the ad is found by
// binary search (campaigns and their ads are sorted by id in every payload).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "sha256.hpp"

namespace adpop {

enum class TokenKind : std::uint8_t { kImpression = 1, kClick = 2, kCaps = 3 };

struct TrackingToken {
  TokenKind kind = TokenKind::kImpression;
  std::uint32_t expires = 0;
  std::uint64_t request_hash = 0;
  // The snapshot version that served the ad: the origin prices the event at that
  // version's eCPM, whichever version is serving when the pixel fires.
  std::uint32_t version = 0;
  std::string_view campaign;
  std::string_view ad;
  std::string_view placement;
};

enum class TokenError : std::uint8_t { kNone, kMalformed, kForged, kExpired };

class TokenSigner {
 public:
  // `key` is the secret from --token-key (at least 16 bytes).
  explicit TokenSigner(std::string key) : key_(std::move(key)), hmac_(key_) {}
  bool usable() const { return key_.size() >= 16; }

  // Appends the base64url token to `out` (TrackingPair signs both kinds with one MAC).
  void sign(const TrackingToken& token, std::string& out) const;
  // Decodes `text` into `scratch` and fills `out` (views into scratch). Checks the MAC
  // before anything else is trusted, then expiry against `now`.
  TokenError verify(std::string_view text, std::uint32_t now, std::string& scratch, TrackingToken& out) const;

  // The generic seal: body + MAC, base64url. `open` checks the MAC first and returns the
  // body (a view into scratch).
  void seal(std::string_view body, std::string& out) const;
  // The same, with the body already in `buffer`: the tag is appended there, so a caller
  // that keeps the buffer seals with no allocation (the request path's caps tokens).
  void seal_buffer(std::string& buffer, std::string& out) const;
  TokenError open(std::string_view text, std::string& scratch, std::string_view* body) const;

 private:
  friend class TrackingPair;
  void mac(const unsigned char* data, std::size_t n, unsigned char* out) const;
  std::string key_;
  HmacSha256 hmac_;
};

// The impression and click tokens of one ad, from one MAC.
class TrackingPair {
 public:
  TrackingPair(const TokenSigner& signer, const TrackingToken& token);
  // Appends the base64url token of `kind` (impression or click) to `out`.
  void append(TokenKind kind, std::string& out) const;

 private:
  unsigned char body_[1 + 4 + 8 + 4 + 3 * 256];
  std::size_t size_ = 0;
  std::uint8_t mac_[32];
};

std::uint64_t request_hash(std::string_view request_id);

// Frequency-cap state the client keeps and echoes (a first-party token): per (scope, id,
// window) the start of the current window and the ads served in it. Signed, bound to the
// user key, at most kMaxCapEntries entries (oldest windows dropped first).
struct CapEntry {
  std::uint8_t scope = 0;    // 0 campaign, 1 advertiser (snapshot CapScope)
  std::uint32_t id = 0;      // hash of the campaign or advertiser id
  std::uint32_t window = 0;  // seconds
  std::uint32_t start = 0;   // unix seconds the window opened
  std::uint16_t count = 0;
};
inline constexpr std::size_t kMaxCapEntries = 48;

// Empty `out` and false when the token is absent, forged, malformed or another user's.
bool decode_caps(const TokenSigner& signer, std::string_view text, std::uint64_t user, std::string& scratch,
                 std::vector<CapEntry>& out);
// `scratch` is a buffer the caller keeps across requests (no allocation once warm).
void encode_caps(const TokenSigner& signer, std::uint64_t user, const std::vector<CapEntry>& entries,
                 std::string& out, std::string& scratch);

}  // namespace adpop
