// Tracking and cap tokens: round trips, forgery, expiry, binding to the user.
#include <gtest/gtest.h>

#include <cctype>
#include <cstdio>

#include "spool.hpp"
#include "token.hpp"

namespace adpop {
namespace {

const TokenSigner kSigner(std::string(32, 'k'));

TEST(Token, RoundTrip) {
  TrackingToken t;
  t.kind = TokenKind::kClick;
  t.expires = 2000;
  t.request_hash = 0x1122334455667788ULL;
  t.campaign = "camp-1";
  t.ad = "ad-1";
  t.placement = "slot";
  std::string text;
  kSigner.sign(t, text);
  for (char c : text) EXPECT_TRUE(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_');
  std::string scratch;
  TrackingToken out;
  ASSERT_EQ(kSigner.verify(text, 1000, scratch, out), TokenError::kNone);
  EXPECT_EQ(out.kind, TokenKind::kClick);
  EXPECT_EQ(out.request_hash, t.request_hash);
  EXPECT_EQ(out.campaign, "camp-1");
  EXPECT_EQ(out.ad, "ad-1");
  EXPECT_EQ(out.placement, "slot");
  EXPECT_EQ(kSigner.verify(text, 2001, scratch, out), TokenError::kExpired);
}

TEST(Token, EveryCharacterChangeIsRefused) {
  TrackingToken t;
  t.expires = 5000;
  t.campaign = "c";
  t.ad = "a";
  std::string text;
  kSigner.sign(t, text);
  std::string scratch;
  TrackingToken out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    std::string bad = text;
    bad[i] = bad[i] == 'A' ? 'B' : 'A';
    TokenError e = kSigner.verify(bad, 1000, scratch, out);
    // The last character may only carry padding bits; all else must fail.
    if (i + 1 < text.size()) {
      EXPECT_NE(e, TokenError::kNone) << i;
    }
  }
  const TokenSigner other(std::string(32, 'x'));
  EXPECT_EQ(other.verify(text, 1000, scratch, out), TokenError::kForged);
  EXPECT_EQ(kSigner.verify("", 1000, scratch, out), TokenError::kMalformed);
  EXPECT_EQ(kSigner.verify("***", 1000, scratch, out), TokenError::kMalformed);
}

TEST(CapToken, RoundTripAndUserBinding) {
  std::vector<CapEntry> in = {{0, crc32_ieee("camp-1", 6), 3600, 100, 2},
                              {1, crc32_ieee("adv-1", 5), 86400, 50, 7}};
  std::string text;
  encode_caps(kSigner, request_hash("alice"), in, text);
  std::string scratch;
  std::vector<CapEntry> out;
  ASSERT_TRUE(decode_caps(kSigner, text, request_hash("alice"), scratch, out));
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[1].count, 7);
  EXPECT_EQ(out[1].window, 86400u);
  EXPECT_FALSE(decode_caps(kSigner, text, request_hash("bob"), scratch, out));
  EXPECT_TRUE(out.empty());
  text[3] = text[3] == 'A' ? 'B' : 'A';
  EXPECT_FALSE(decode_caps(kSigner, text, request_hash("alice"), scratch, out));
}

TEST(CapToken, KeepsTheNewestEntries) {
  std::vector<CapEntry> in;
  for (std::uint32_t i = 0; i < kMaxCapEntries + 10; ++i) in.push_back({0, i, 60, i, 1});
  std::string text, scratch;
  encode_caps(kSigner, 1, in, text);
  std::vector<CapEntry> out;
  ASSERT_TRUE(decode_caps(kSigner, text, 1, scratch, out));
  ASSERT_EQ(out.size(), kMaxCapEntries);
  EXPECT_EQ(out.back().id, kMaxCapEntries + 9);
}

TEST(HmacSha256, Rfc4231Case2) {
  HmacSha256 h("Jefe");
  const std::string data = "what do ya want for nothing?";
  std::uint8_t out[32];
  h.mac(data.data(), data.size(), out);
  char hex[65];
  for (int i = 0; i < 32; ++i) std::snprintf(hex + 2 * i, 3, "%02x", out[i]);
  EXPECT_EQ(std::string(hex), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

TEST(Sha256, LongInputAcrossBlocks) {
  Sha256 h;
  const std::string a(1000000, 'a');
  h.update(a.data(), 333);
  h.update(a.data() + 333, a.size() - 333);
  std::uint8_t out[32];
  h.finish(out);
  char hex[65];
  for (int i = 0; i < 32; ++i) std::snprintf(hex + 2 * i, 3, "%02x", out[i]);
  EXPECT_EQ(std::string(hex), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Crc32c, KnownVector) {
  // The check value of CRC-32C.
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
}

}  // namespace
}  // namespace adpop
