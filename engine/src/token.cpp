#include "token.hpp"

#include <openssl/crypto.h>

#include <cstring>

namespace adpop {

namespace {

constexpr std::size_t kMacBytes = 12;
constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

// Appends the unpadded base64url text of `data`: sized once, then written in place.
void base64url(const unsigned char* data, std::size_t n, std::string& out) {
  const std::size_t at = out.size();
  out.resize(at + (n / 3) * 4 + (n % 3 ? n % 3 + 1 : 0));
  char* o = out.data() + at;
  std::size_t i = 0;
  for (; i + 3 <= n; i += 3) {
    std::uint32_t v = std::uint32_t{data[i]} << 16 | std::uint32_t{data[i + 1]} << 8 | data[i + 2];
    *o++ = kAlphabet[v >> 18];
    *o++ = kAlphabet[(v >> 12) & 63];
    *o++ = kAlphabet[(v >> 6) & 63];
    *o++ = kAlphabet[v & 63];
  }
  if (n - i == 1) {
    std::uint32_t v = std::uint32_t{data[i]} << 16;
    *o++ = kAlphabet[v >> 18];
    *o++ = kAlphabet[(v >> 12) & 63];
  } else if (n - i == 2) {
    std::uint32_t v = std::uint32_t{data[i]} << 16 | std::uint32_t{data[i + 1]} << 8;
    *o++ = kAlphabet[v >> 18];
    *o++ = kAlphabet[(v >> 12) & 63];
    *o++ = kAlphabet[(v >> 6) & 63];
  }
}

int decode_char(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '-') return 62;
  if (c == '_') return 63;
  return -1;
}

bool unbase64url(std::string_view text, std::string& out) {
  out.clear();
  if (text.size() % 4 == 1) return false;
  std::uint32_t acc = 0;
  int bits = 0;
  for (char c : text) {
    int d = decode_char(c);
    if (d < 0) return false;
    acc = acc << 6 | static_cast<std::uint32_t>(d);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xFF));
    }
  }
  return true;
}

}  // namespace

void TokenSigner::seal(std::string_view body, std::string& out) const {
  std::string sealed(body);
  seal_buffer(sealed, out);
}

void TokenSigner::seal_buffer(std::string& buffer, std::string& out) const {
  unsigned char tag[kMacBytes];
  mac(reinterpret_cast<const unsigned char*>(buffer.data()), buffer.size(), tag);
  buffer.append(reinterpret_cast<const char*>(tag), kMacBytes);
  base64url(reinterpret_cast<const unsigned char*>(buffer.data()), buffer.size(), out);
}

TokenError TokenSigner::open(std::string_view text, std::string& scratch, std::string_view* body) const {
  if (text.empty() || text.size() > 4096 || !unbase64url(text, scratch) || scratch.size() < kMacBytes + 1)
    return TokenError::kMalformed;
  const std::size_t n = scratch.size() - kMacBytes;
  unsigned char tag[kMacBytes];
  mac(reinterpret_cast<const unsigned char*>(scratch.data()), n, tag);
  if (CRYPTO_memcmp(tag, scratch.data() + n, kMacBytes) != 0) return TokenError::kForged;
  *body = std::string_view(scratch.data(), n);
  return TokenError::kNone;
}

namespace {
constexpr std::size_t kCapEntryBytes = 1 + 4 + 4 + 4 + 2;
void put(std::string& b, std::uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) b.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
std::uint64_t get(const unsigned char* p, int bytes) {
  std::uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= std::uint64_t{p[i]} << (8 * i);
  return v;
}
}  // namespace

bool decode_caps(const TokenSigner& signer, std::string_view text, std::uint64_t user, std::string& scratch,
                 std::vector<CapEntry>& out) {
  out.clear();
  std::string_view body;
  if (text.empty() || signer.open(text, scratch, &body) != TokenError::kNone) return false;
  const auto* p = reinterpret_cast<const unsigned char*>(body.data());
  if (body.size() < 9 || p[0] != static_cast<unsigned char>(TokenKind::kCaps)) return false;
  if (get(p + 1, 8) != user) return false;  // another user's token: start afresh
  const std::size_t n = (body.size() - 9) / kCapEntryBytes;
  if ((body.size() - 9) % kCapEntryBytes != 0 || n > kMaxCapEntries) return false;
  for (std::size_t i = 0; i < n; ++i) {
    const unsigned char* e = p + 9 + i * kCapEntryBytes;
    CapEntry entry;
    entry.scope = e[0];
    entry.id = static_cast<std::uint32_t>(get(e + 1, 4));
    entry.window = static_cast<std::uint32_t>(get(e + 5, 4));
    entry.start = static_cast<std::uint32_t>(get(e + 9, 4));
    entry.count = static_cast<std::uint16_t>(get(e + 13, 2));
    out.push_back(entry);
  }
  return true;
}

void encode_caps(const TokenSigner& signer, std::uint64_t user, const std::vector<CapEntry>& entries,
                 std::string& out, std::string& scratch) {
  std::string& body = scratch;
  body.clear();
  body.push_back(static_cast<char>(TokenKind::kCaps));
  put(body, user, 8);
  // Newest windows first when trimming: old windows are the least likely to still cap.
  std::size_t skip = entries.size() > kMaxCapEntries ? entries.size() - kMaxCapEntries : 0;
  for (std::size_t i = skip; i < entries.size(); ++i) {
    const CapEntry& e = entries[i];
    body.push_back(static_cast<char>(e.scope));
    put(body, e.id, 4);
    put(body, e.window, 4);
    put(body, e.start, 4);
    put(body, e.count, 2);
  }
  signer.seal_buffer(body, out);
}

void TokenSigner::mac(const unsigned char* data, std::size_t n, unsigned char* out) const {
  std::uint8_t full[32];
  hmac_.mac(data, n, full);
  std::memcpy(out, full, kMacBytes);
}

std::uint64_t request_hash(std::string_view request_id) {
  std::uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : request_id) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

namespace {
// Stands in for the kind byte under the tracking MAC; caps tokens begin with kCaps (3), so
// no tracking MAC input is ever a caps MAC input.
constexpr unsigned char kTrackingDomain = 0x10;
std::size_t tag_offset(TokenKind kind) {
  return kind == TokenKind::kClick ? kMacBytes : 0;
}
}  // namespace

TrackingPair::TrackingPair(const TokenSigner& signer, const TrackingToken& token) {
  std::size_t n = 0;
  body_[n++] = kTrackingDomain;
  for (int i = 0; i < 4; ++i) body_[n++] = static_cast<unsigned char>((token.expires >> (8 * i)) & 0xFF);
  for (int i = 0; i < 8; ++i) body_[n++] = static_cast<unsigned char>((token.request_hash >> (8 * i)) & 0xFF);
  for (int i = 0; i < 4; ++i) body_[n++] = static_cast<unsigned char>((token.version >> (8 * i)) & 0xFF);
  for (std::string_view id : {token.campaign, token.ad, token.placement}) {
    const std::size_t len = id.size() > 255 ? 255 : id.size();
    body_[n++] = static_cast<unsigned char>(len);
    if (len) std::memcpy(body_ + n, id.data(), len);  // an empty view may hold a null pointer
    n += len;
  }
  size_ = n;
  signer.hmac_.mac(body_, size_, mac_);
}

void TrackingPair::append(TokenKind kind, std::string& out) const {
  unsigned char token[sizeof body_ + kMacBytes];
  std::memcpy(token, body_, size_);
  token[0] = static_cast<unsigned char>(kind);
  std::memcpy(token + size_, mac_ + tag_offset(kind), kMacBytes);
  base64url(token, size_ + kMacBytes, out);
}

void TokenSigner::sign(const TrackingToken& token, std::string& out) const {
  TrackingPair(*this, token).append(token.kind, out);
}

TokenError TokenSigner::verify(std::string_view text, std::uint32_t now, std::string& scratch,
                               TrackingToken& out) const {
  if (text.empty() || text.size() > 1200 || !unbase64url(text, scratch)) return TokenError::kMalformed;
  if (scratch.size() < 1 + 4 + 8 + 4 + 3 + kMacBytes) return TokenError::kMalformed;
  const std::size_t body_len = scratch.size() - kMacBytes;
  auto* data = reinterpret_cast<unsigned char*>(scratch.data());
  out.kind = static_cast<TokenKind>(data[0]);
  if (out.kind != TokenKind::kImpression && out.kind != TokenKind::kClick) return TokenError::kMalformed;
  // The MAC covers the body under the tracking domain byte; the kind picks the tag's slice.
  std::uint8_t full[32];
  data[0] = kTrackingDomain;
  hmac_.mac(data, body_len, full);
  data[0] = static_cast<unsigned char>(out.kind);
  // Constant time: a forger learns nothing from how long a wrong tag takes to refuse.
  if (CRYPTO_memcmp(full + tag_offset(out.kind), data + body_len, kMacBytes) != 0) return TokenError::kForged;
  std::size_t p = 1;
  out.expires = 0;
  for (int i = 0; i < 4; ++i) out.expires |= std::uint32_t{data[p++]} << (8 * i);
  out.request_hash = 0;
  for (int i = 0; i < 8; ++i) out.request_hash |= std::uint64_t{data[p++]} << (8 * i);
  out.version = 0;
  for (int i = 0; i < 4; ++i) out.version |= std::uint32_t{data[p++]} << (8 * i);
  std::string_view* ids[] = {&out.campaign, &out.ad, &out.placement};
  for (auto* id : ids) {
    if (p >= body_len) return TokenError::kMalformed;
    std::size_t n = data[p++];
    if (p + n > body_len) return TokenError::kMalformed;
    *id = std::string_view(scratch.data() + p, n);
    p += n;
  }
  if (p != body_len) return TokenError::kMalformed;
  if (now > out.expires) return TokenError::kExpired;
  return TokenError::kNone;
}

}  // namespace adpop
