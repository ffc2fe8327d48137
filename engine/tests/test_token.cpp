// Tracking and cap tokens: round trips, forgery, expiry, binding to the user.
#include <gtest/gtest.h>

#include <cctype>
#include <cstdio>
#include <cstring>
#include <utility>

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
  t.version = 0xA1B2C3D4u;
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
  EXPECT_EQ(out.version, t.version);
  EXPECT_EQ(out.campaign, "camp-1");
  EXPECT_EQ(out.ad, "ad-1");
  EXPECT_EQ(out.placement, "slot");
  EXPECT_EQ(kSigner.verify(text, 2001, scratch, out), TokenError::kExpired);
}

TEST(Token, OnePairTwoTagsAndNoKindFlip) {
  TrackingToken t;
  t.expires = 5000;
  t.request_hash = 42;
  t.campaign = "camp-1";
  t.ad = "ad-1";
  t.placement = "slot";
  const TrackingPair pair(kSigner, t);
  std::string imp, click;
  pair.append(TokenKind::kImpression, imp);
  pair.append(TokenKind::kClick, click);
  std::string scratch;
  TrackingToken out;
  ASSERT_EQ(kSigner.verify(imp, 1000, scratch, out), TokenError::kNone);
  EXPECT_EQ(out.kind, TokenKind::kImpression);
  ASSERT_EQ(kSigner.verify(click, 1000, scratch, out), TokenError::kNone);
  EXPECT_EQ(out.kind, TokenKind::kClick);
  EXPECT_NE(imp, click);
  // Rewriting an impression token's kind byte to "click" keeps the impression's tag: refused.
  std::string flipped = imp;
  // The first base64 character holds the kind byte's top 6 bits, the second its low 2.
  flipped[0] = click[0];
  flipped[1] = click[1];
  EXPECT_EQ(kSigner.verify(flipped, 1000, scratch, out), TokenError::kForged);
  // sign() gives the same token as the pair.
  std::string single;
  t.kind = TokenKind::kClick;
  kSigner.sign(t, single);
  EXPECT_EQ(single, click);
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
  std::string text, scratch;
  encode_caps(kSigner, request_hash("alice"), in, text, scratch);
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
  encode_caps(kSigner, 1, in, text, scratch);
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
  // Split anywhere, the running CRC is the same (records are checksummed in parts).
  const std::string text = "The quick brown fox jumps over the lazy dog";
  for (std::size_t cut = 0; cut <= text.size(); ++cut)
    EXPECT_EQ(crc32c(text.data() + cut, text.size() - cut, crc32c(text.data(), cut)),
              crc32c(text.data(), text.size()))
        << cut;
}

TEST(Crc32c, InstructionAndTablesAgree) {
  // The two paths the CPU picks between: every length and alignment up to a few words.
  std::string data(300, '\0');
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 131 + 7);
  EXPECT_EQ(crc32c_tables("123456789", 9), 0xE3069283u);
  for (std::size_t start = 0; start < 8; ++start)
    for (std::size_t n = 0; start + n <= data.size(); n += 13)
      EXPECT_EQ(crc32c(data.data() + start, n, 0x1234u), crc32c_tables(data.data() + start, n, 0x1234u))
          << start << " " << n;
}

TEST(Crc32Ieee, MatchesZlib) {
  // zlib.crc32 values: the compiler hashes attribute values with it, the engine looks them up.
  EXPECT_EQ(crc32_ieee("123456789", 9), 0xCBF43926u);
  EXPECT_EQ(crc32_ieee("The quick brown fox jumps over the lazy dog", 43), 0x414FA339u);
  EXPECT_EQ(crc32_ieee("", 0), 0u);
}

// Every padding length (55, 56 and 63 bytes cross the one-block boundary) against known digests
// would need a table; instead the two compression paths must agree on random states and blocks,
// and the known-answer tests above pin the path this CPU uses.
TEST(Sha256, AcceleratedPathAgreesWithPortable) {
  if (!sha256_accelerated())
    GTEST_SKIP() << "this CPU has no SHA extensions; the portable path is the only one";
  std::uint64_t x = 0x243F6A8885A308D3ULL;
  auto next = [&] {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
  };
  for (int round = 0; round < 1000; ++round) {
    std::uint32_t a[8], b[8];
    std::uint8_t block[64];
    for (auto& w : a) w = static_cast<std::uint32_t>(next());
    std::memcpy(b, a, sizeof a);
    for (auto& byte : block) byte = static_cast<std::uint8_t>(next());
    sha256_compress_for_test(a, block, false);
    sha256_compress_for_test(b, block, true);
    ASSERT_EQ(0, std::memcmp(a, b, sizeof a)) << "round " << round;
  }
}

TEST(Sha256, PaddingAtEveryLengthAroundABlock) {
  // sha256 of "" and of 55, 56, 63, 64 and 65 'a's (coreutils sha256sum).
  const std::pair<std::size_t, const char*> cases[] = {
      {0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
      {55, "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318"},
      {56, "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a"},
      {63, "7d3e74a05d7db15bce4ad9ec0658ea98e3f06eeecf16b4c6fff2da457ddc2f34"},
      {64, "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb"},
      {65, "635361c48bb9eab14198e76ea8ab7f1a41685d6ad62aa9146d301d4f17eb0ae0"}};
  for (const auto& [n, want] : cases) {
    Sha256 h;
    const std::string a(n, 'a');
    h.update(a.data(), a.size());
    std::uint8_t out[32];
    h.finish(out);
    char hex[65];
    for (int i = 0; i < 32; ++i) std::snprintf(hex + 2 * i, 3, "%02x", out[i]);
    EXPECT_EQ(std::string(hex), want) << n << " bytes";
  }
}

}  // namespace
}  // namespace adpop
