// Signed tracking tokens for impression and click URLs: compact, HMAC-SHA256, expiring.
//
// Layout before base64url (no padding):
//   u8 kind | u32 expires (unix s, LE) | u64 request hash (LE) |
//   u8 len + campaign id | u8 len + ad id | u8 len + placement id | 12-byte HMAC-SHA256 prefix
// Ids rather than table positions, so a token outlives a snapshot swap: the ad is found by
// binary search (campaigns and their ads are sorted by id in every payload).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace adpop {

enum class TokenKind : std::uint8_t { kImpression = 1, kClick = 2 };

struct TrackingToken {
  TokenKind kind = TokenKind::kImpression;
  std::uint32_t expires = 0;
  std::uint64_t request_hash = 0;
  std::string_view campaign;
  std::string_view ad;
  std::string_view placement;
};

enum class TokenError : std::uint8_t { kNone, kMalformed, kForged, kExpired };

class TokenSigner {
 public:
  // `key` is the secret from --token-key (at least 16 bytes).
  explicit TokenSigner(std::string key) : key_(std::move(key)) {}
  bool usable() const { return key_.size() >= 16; }

  // Appends the base64url token to `out`.
  void sign(const TrackingToken& token, std::string& out) const;
  // Decodes `text` into `scratch` and fills `out` (views into scratch). Checks the MAC
  // before anything else is trusted, then expiry against `now`.
  TokenError verify(std::string_view text, std::uint32_t now, std::string& scratch,
                    TrackingToken& out) const;

 private:
  std::string key_;
};

std::uint64_t request_hash(std::string_view request_id);

}  // namespace adpop
