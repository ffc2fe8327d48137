#include "spool.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdio>
#include <ctime>

namespace adpop {

namespace {

constexpr std::array<std::uint32_t, 256> make_table() {
  std::array<std::uint32_t, 256> t{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;  // Castagnoli
    t[i] = c;
  }
  return t;
}

constexpr auto kTable = make_table();

constexpr std::array<std::uint32_t, 256> make_ieee_table() {
  std::array<std::uint32_t, 256> t{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = c & 1 ? (c >> 1) ^ 0xEDB88320u : c >> 1;
    t[i] = c;
  }
  return t;
}

constexpr auto kIeeeTable = make_ieee_table();

void put_le32(std::string& b, std::size_t at, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xFF);
}

}  // namespace

std::uint32_t crc32c(const void* data, std::size_t n, std::uint32_t crc) {
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (std::size_t i = 0; i < n; ++i) crc = kTable[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

std::uint32_t crc32_ieee(const void* data, std::size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  std::uint32_t crc = 0xFFFFFFFFu;
  for (std::size_t i = 0; i < n; ++i) crc = kIeeeTable[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

Spool::Spool(std::string dir, std::uint32_t shard, std::uint64_t max_bytes, std::uint32_t max_age_s)
    : dir_(std::move(dir)), shard_(shard), max_bytes_(max_bytes), max_age_s_(max_age_s) {
  buffer_.reserve(1 << 16);
}

Spool::~Spool() {
  flush(static_cast<std::int64_t>(std::time(nullptr)));
  close_segment();
}

void Spool::begin(EventType type, std::uint64_t time_ms) {
  if (dir_.empty()) {
    // No spool folder: the record is only counted (as dropped), not built.
    building_ = false;
    ++stats_.records;
    ++stats_.disabled_dropped;
    return;
  }
  building_ = true;
  record_start_ = buffer_.size();
  buffer_.append(8, '\0');  // length and CRC, filled by end()
  buffer_.push_back(static_cast<char>(type));
  for (int i = 0; i < 8; ++i) buffer_.push_back(static_cast<char>((time_ms >> (8 * i)) & 0xFF));
}

void Spool::put_string(std::string_view s) {
  if (!building_) return;
  std::size_t n = s.size() > 0xFFFF ? 0xFFFF : s.size();
  buffer_.push_back(static_cast<char>(n & 0xFF));
  buffer_.push_back(static_cast<char>(n >> 8));
  buffer_.append(s.data(), n);
}

void Spool::put_u32(std::uint32_t v) {
  if (!building_) return;
  for (int i = 0; i < 4; ++i) buffer_.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

void Spool::end() {
  if (!building_) return;
  const std::size_t body = record_start_ + 8;
  const std::uint32_t len = static_cast<std::uint32_t>(buffer_.size() - body);
  put_le32(buffer_, record_start_, len);
  put_le32(buffer_, record_start_ + 4, crc32c(buffer_.data() + body, len));
  ++stats_.records;
  ++pending_records_;
}

bool Spool::open_segment(std::int64_t now_s) {
  char name[96];
  std::snprintf(name, sizeof name, "/shard-%u-%lld-%06llu.spool", shard_, static_cast<long long>(now_s),
                static_cast<unsigned long long>(sequence_++));
  path_ = dir_ + name;
  fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
  if (fd_ < 0) return false;
  segment_bytes_ = 0;
  opened_s_ = now_s;
  return true;
}

void Spool::close_segment() {
  if (fd_ < 0) return;
  ::close(fd_);
  fd_ = -1;
  // Renaming marks the segment complete: the shipper never reads one still being written.
  std::string closed = path_.substr(0, path_.size() - 6) + ".closed";
  if (std::rename(path_.c_str(), closed.c_str()) == 0) ++stats_.segments_closed;
}

void Spool::flush(std::int64_t now_s) {
  if (fd_ >= 0 && (segment_bytes_ >= max_bytes_ || now_s - opened_s_ >= max_age_s_)) close_segment();
  if (buffer_.empty()) return;
  if (dir_.empty()) return;  // nothing is built without a folder (see begin)
  if (fd_ < 0 && !open_segment(now_s)) {
    stats_.write_errors += pending_records_;
    pending_records_ = 0;
    buffer_.clear();
    return;
  }
  std::size_t off = 0;
  while (off < buffer_.size()) {
    ssize_t n = ::write(fd_, buffer_.data() + off, buffer_.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      stats_.write_errors += pending_records_;  // a torn tail is skipped by the CRC on read
      break;
    }
    off += static_cast<std::size_t>(n);
  }
  stats_.bytes += off;
  segment_bytes_ += off;
  pending_records_ = 0;
  buffer_.clear();
}

}  // namespace adpop
