#include "spool.hpp"

#include <dirent.h>
#include <fcntl.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <vector>

namespace adpop {

namespace {

// Slicing-by-8 tables for a reflected CRC-32 polynomial: eight bytes per step through
// independent lookups, instead of one byte per dependent lookup. Request values are hashed
// on every ad request, and spool records are checksummed as they are written.
using Tables = std::array<std::array<std::uint32_t, 256>, 8>;

constexpr Tables make_tables(std::uint32_t poly) {
  Tables t{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = c & 1 ? (c >> 1) ^ poly : c >> 1;
    t[0][i] = c;
  }
  for (std::uint32_t i = 0; i < 256; ++i)
    for (std::size_t s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  return t;
}

constexpr Tables kCastagnoli = make_tables(0x82F63B78u);
constexpr Tables kIeee = make_tables(0xEDB88320u);

// `crc` is the running (inverted) register; returns it after `n` more bytes.
std::uint32_t slice8(const Tables& t, std::uint32_t crc, const unsigned char* p, std::size_t n) {
  for (; n >= 8; n -= 8, p += 8) {
    const std::uint32_t lo = (std::uint32_t{p[0]} | std::uint32_t{p[1]} << 8 | std::uint32_t{p[2]} << 16 |
                              std::uint32_t{p[3]} << 24) ^
                             crc;
    crc = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^ t[3][p[4]] ^
          t[2][p[5]] ^ t[1][p[6]] ^ t[0][p[7]];
  }
  for (; n > 0; --n, ++p) crc = t[0][(crc ^ *p) & 0xFF] ^ (crc >> 8);
  return crc;
}

void put_le32(std::string& b, std::size_t at, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xFF);
}

#if defined(__x86_64__)
// SSE4.2's crc32 instruction computes exactly CRC-32C, eight bytes per instruction: every
// spool record is checksummed on the serving path, so the tables are only the fallback.
__attribute__((target("sse4.2"))) std::uint32_t crc32c_sse42(std::uint32_t crc, const unsigned char* p,
                                                             std::size_t n) {
  std::uint64_t c = crc;
  for (; n >= 8; n -= 8, p += 8) {
    std::uint64_t word;
    std::memcpy(&word, p, 8);
    c = __builtin_ia32_crc32di(c, word);
  }
  auto c32 = static_cast<std::uint32_t>(c);
  for (; n > 0; --n, ++p) c32 = __builtin_ia32_crc32qi(c32, *p);
  return c32;
}

bool have_sse42() {
  unsigned a, b, c, d;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_SSE4_2);
}

const bool kHaveSse42 = have_sse42();
#endif

}  // namespace

std::uint32_t crc32c_tables(const void* data, std::size_t n, std::uint32_t crc) {
  return ~slice8(kCastagnoli, ~crc, static_cast<const unsigned char*>(data), n);
}

std::uint32_t crc32c(const void* data, std::size_t n, std::uint32_t crc) {
  const auto* p = static_cast<const unsigned char*>(data);
#if defined(__x86_64__)
  if (kHaveSse42) return ~crc32c_sse42(~crc, p, n);
#endif
  return crc32c_tables(p, n, crc);
}

std::uint32_t crc32_ieee(const void* data, std::size_t n) {
  return ~slice8(kIeee, 0xFFFFFFFFu, static_cast<const unsigned char*>(data), n);
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

namespace {
constexpr std::uint64_t kReserveChunk = 256 << 10;  // reserved at a time: few fallocate calls
constexpr std::uint32_t kMaxRecord = 1u << 20;      // as readers believe (engine/SPOOL.md)

bool ends_with(const std::string& s, const char* suffix) {
  const std::size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

std::vector<std::string> segment_names(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = opendir(dir.c_str());
  if (!d) return names;
  while (dirent* e = readdir(d)) {
    std::string name = e->d_name;
    if (name.compare(0, 6, "shard-") == 0 && (ends_with(name, ".spool") || ends_with(name, ".closed")))
      names.push_back(std::move(name));
  }
  closedir(d);
  return names;
}

// Where the whole records of `data` end, by the readers' rule (engine/SPOOL.md): a record
// with a bad CRC is passed over only when the record after it checks.
std::size_t whole_records_end(const std::string& data) {
  auto frame = [&](std::size_t pos, std::size_t* end, std::uint32_t* crc) {
    if (pos + 8 > data.size()) return false;
    std::uint32_t len = 0, c = 0;
    std::memcpy(&len, data.data() + pos, 4);
    std::memcpy(&c, data.data() + pos + 4, 4);
    if (len > kMaxRecord || pos + 8 + len > data.size()) return false;
    *end = pos + 8 + len;
    *crc = c;
    return true;
  };
  auto intact = [&](std::size_t pos, std::size_t end, std::uint32_t c) {
    return crc32c(data.data() + pos + 8, end - pos - 8) == c;
  };
  std::size_t pos = 0, end = 0, next_end = 0;
  std::uint32_t c = 0, next_c = 0;
  while (frame(pos, &end, &c)) {
    if (!intact(pos, end, c) && !(frame(end, &next_end, &next_c) && intact(end, next_end, next_c))) break;
    pos = end;
  }
  return pos;
}
}  // namespace

std::uint32_t close_leftovers(const std::string& dir, std::uint64_t* bytes) {
  std::uint32_t closed = 0;
  *bytes = 0;
  for (const std::string& name : segment_names(dir)) {
    if (!ends_with(name, ".spool")) continue;
    const std::string path = dir + "/" + name;
    const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) continue;
    std::string data;
    char buf[1 << 16];
    ssize_t n;
    while ((n = ::read(fd, buf, sizeof buf)) > 0) data.append(buf, static_cast<std::size_t>(n));
    const std::size_t end = whole_records_end(data);
    // Also releases space a crashed run had reserved past the end.
    const bool cut = ::ftruncate(fd, static_cast<off_t>(end)) == 0;
    ::fsync(fd);
    ::close(fd);
    if (!cut) continue;
    const std::string done = path.substr(0, path.size() - 6) + ".closed";
    if (std::rename(path.c_str(), done.c_str()) == 0) {
      ++closed;
      *bytes += end;
    }
  }
  return closed;
}

std::uint64_t spool_backlog(const std::string& dir) {
  std::uint64_t total = 0;
  for (const std::string& name : segment_names(dir)) {
    struct stat st {};
    if (::stat((dir + "/" + name).c_str(), &st) == 0) total += static_cast<std::uint64_t>(st.st_size);
  }
  return total;
}

bool Spool::open_segment(std::int64_t now_s) {
  char name[96];
  std::snprintf(name, sizeof name, "/shard-%u-%lld-%06llu.spool", shard_, static_cast<long long>(now_s),
                static_cast<unsigned long long>(sequence_++));
  path_ = dir_ + name;
  fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
  if (fd_ < 0) return false;
  segment_bytes_ = 0;
  allocated_ = 0;
  opened_s_ = now_s;
  return true;
}

void Spool::close_segment() {
  if (fd_ < 0) return;
  // Gives back the space reserved past the last record.
  if (allocated_ > segment_bytes_) (void)::ftruncate(fd_, static_cast<off_t>(segment_bytes_));
  ::close(fd_);
  fd_ = -1;
  // Renaming marks the segment complete.
  std::string closed = path_.substr(0, path_.size() - 6) + ".closed";
  if (std::rename(path_.c_str(), closed.c_str()) == 0) ++stats_.segments_closed;
}

bool Spool::room(std::size_t n, std::size_t keep, std::int64_t now_s) {
  if (dir_.empty()) return true;
  if (fd_ < 0 && !open_segment(now_s)) {
    ++stats_.no_room;
    return false;
  }
  const std::uint64_t need = segment_bytes_ + buffer_.size() + n + keep;
  if (need <= allocated_ || !preallocate_) return true;
  const std::uint64_t want = need > allocated_ + kReserveChunk ? need : allocated_ + kReserveChunk;
  int rc = ::fallocate(fd_, FALLOC_FL_KEEP_SIZE, static_cast<off_t>(allocated_),
                       static_cast<off_t>(want - allocated_));
  if (rc != 0 && errno == EOPNOTSUPP) {
    preallocate_ = false;  // nothing to reserve with: a failed write is still cut back
    std::fprintf(stderr, "adpop-engine: %s cannot reserve space (no fallocate); writes decide\n",
                 dir_.c_str());
    return true;
  }
  if (rc == 0) {
    allocated_ = want;
    return true;
  }
  // Not a whole chunk: exactly what this record needs, if that much is left.
  if (::fallocate(fd_, FALLOC_FL_KEEP_SIZE, static_cast<off_t>(allocated_),
                  static_cast<off_t>(need - allocated_)) == 0) {
    allocated_ = need;
    return true;
  }
  ++stats_.no_room;
  return false;
}

bool Spool::flush(std::int64_t now_s) {
  bool written = true;
  if (!buffer_.empty() && !dir_.empty()) {  // nothing is built without a folder (see begin)
    if (fd_ < 0 && !open_segment(now_s)) {
      written = false;
    } else {
      std::size_t off = 0;
      while (off < buffer_.size()) {
        ssize_t n = ::write(fd_, buffer_.data() + off, buffer_.size() - off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
          written = false;
          break;
        }
        off += static_cast<std::size_t>(n);
      }
      if (written) {
        stats_.bytes += off;
        segment_bytes_ += off;
      } else {
        // Cut the part that did reach the file back off, and start a new segment: no tear
        // is left to hide the records written after it.
        (void)::ftruncate(fd_, static_cast<off_t>(segment_bytes_));
        close_segment();
      }
    }
    if (!written) stats_.write_errors += pending_records_;
    pending_records_ = 0;
    buffer_.clear();
  }
  // Rotate after the write, so a record always lands in the segment its room was reserved in.
  if (fd_ >= 0 && (segment_bytes_ >= max_bytes_ || now_s - opened_s_ >= max_age_s_)) close_segment();
  return written;
}

}  // namespace adpop
