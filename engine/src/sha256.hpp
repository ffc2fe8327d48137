// SHA-256 and HMAC-SHA256, self-contained: the request path signs two tracking tokens per
// ad, and OpenSSL 3's EVP layer takes locks on every call (algorithm fetch). The HMAC key's
// inner and outer pad states are computed once, so each MAC is two short hashes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace adpop {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, std::size_t n);
  void finish(std::uint8_t out[32]);

 private:
  void block(const std::uint8_t* p);
  std::uint32_t h_[8];
  std::uint8_t buf_[64];
  std::size_t buffered_ = 0;
  std::uint64_t total_ = 0;
};

// Whether this CPU's SHA extensions do the hashing (else a portable loop).
bool sha256_accelerated();
// One compression of `block` into `state` by the named path (tests compare the two).
void sha256_compress_for_test(std::uint32_t state[8], const std::uint8_t block[64], bool accelerated);

class HmacSha256 {
 public:
  explicit HmacSha256(std::string_view key);
  void mac(const void* data, std::size_t n, std::uint8_t out[32]) const;

 private:
  Sha256 inner_, outer_;
};

}  // namespace adpop
