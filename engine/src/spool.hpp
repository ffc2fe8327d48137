// Per-shard event spool: append-only segment files of CRC32C-framed records (engine/SPOOL.md).
//
// Records are written to the file (the kernel's page cache) before the answer that caused
// them is sent, so a crash of the process loses no answered record. Segments rotate by size
// and age; a rotated segment is renamed to *.closed. The supervisor's shipper sends both
// (an open one up to its last whole record) and deletes a segment once the origin holds it.
//
// Space is reserved on disk (fallocate, file size unchanged) before a record is built, so a
// write never fails for lack of space: a request whose record has no room is refused
// before anything is answered. A write that fails anyway is cut back off the file, the
// segment is rotated, and the caller withholds the answers of that batch.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace adpop {

enum class EventType : std::uint8_t { kDecision = 1, kImpression = 2, kClick = 3 };

std::uint32_t crc32c(const void* data, std::size_t n, std::uint32_t crc = 0);
// The same from tables alone: what crc32c falls back to on a CPU without SSE4.2.
std::uint32_t crc32c_tables(const void* data, std::size_t n, std::uint32_t crc = 0);
// CRC-32 as zlib computes it: the compiler's hash for packed value tables and id keys.
std::uint32_t crc32_ieee(const void* data, std::size_t n);

struct SpoolStats {
  std::uint64_t records = 0;
  std::uint64_t bytes = 0;
  std::uint64_t segments_closed = 0;
  std::uint64_t write_errors = 0;      // records that could not be written (counted, never silent)
  std::uint64_t disabled_dropped = 0;  // records not kept because no --spool was given
  std::uint64_t no_room = 0;           // requests refused because their record had no room
};

// Closes the segments a previous run left open in `dir`: each is cut back to its last whole
// record (a crash of the machine can leave a torn tail) and renamed *.closed. Returns how
// many, and their bytes in `bytes`.
std::uint32_t close_leftovers(const std::string& dir, std::uint64_t* bytes);
// Bytes of all segments in `dir`, open and closed: the PoP's backlog.
std::uint64_t spool_backlog(const std::string& dir);

class Spool {
 public:
  // `dir` empty: spooling disabled (records are counted as dropped).
  Spool(std::string dir, std::uint32_t shard, std::uint64_t max_bytes, std::uint32_t max_age_s);
  ~Spool();
  Spool(const Spool&) = delete;
  Spool& operator=(const Spool&) = delete;

  bool enabled() const { return !dir_.empty(); }
  // Starts a record; fields are appended with the put_* calls, then end() frames it.
  void begin(EventType type, std::uint64_t time_ms);
  void put_string(std::string_view s);
  void put_u32(std::uint32_t v);
  void end();
  // Whether a record of up to `n` bytes fits in space reserved on disk with `keep` bytes
  // still spare after it, reserving more when not. Call before building the record.
  bool room(std::size_t n, std::size_t keep, std::int64_t now_s);
  // Writes buffered records to the segment file; call before sending answers. False when
  // they could not be written: none of them is in the file, and no answer of theirs may go.
  bool flush(std::int64_t now_s);
  const SpoolStats& stats() const { return stats_; }
  const std::string& segment_path() const { return path_; }

 private:
  bool open_segment(std::int64_t now_s);
  void close_segment();

  std::string dir_;
  std::uint32_t shard_;
  std::uint64_t max_bytes_;
  std::uint32_t max_age_s_;
  int fd_ = -1;
  std::string path_;
  std::uint64_t segment_bytes_ = 0;
  std::uint64_t allocated_ = 0;  // bytes of this segment reserved on disk (from its start)
  bool preallocate_ = true;      // false on a file system without fallocate: writes decide
  std::int64_t opened_s_ = 0;
  std::uint64_t sequence_ = 0;
  std::string buffer_;
  std::size_t record_start_ = 0;
  std::uint64_t pending_records_ = 0;
  bool building_ = false;  // the current record is being framed (a spool folder is set)
  SpoolStats stats_;
};

}  // namespace adpop
