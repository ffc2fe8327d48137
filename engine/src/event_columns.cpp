// The origin's intake decoder (libadpop_events.so, loaded by appliance/origin/columns.py):
// a batch's spool records (engine/SPOOL.md) into columns Arrow takes without a copy per
// value, with each row's key, so that storing a batch costs about what DuckDB's own bulk
// insert does. A Python loop over the same records costs several times more; the Python
// decoder in appliance/origin/events.py stays as the reference the tests compare this to.
//
// Rows per record: a decision gives one row per ad it served ("served") and then one for
// itself; an impression or a click gives one. A row's key is the first 16 bytes of the
// SHA-256 of its identity text (fields joined by 0x1F, numbers in decimal):
//   impression  "impression", request hash, campaign, ad, placement
//   served      "served", pop, segment, offset, placement index, slot
//   otherwise   "record", pop, segment, offset
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "json.hpp"
#include "sha256.hpp"
#include "spool.hpp"

namespace {

constexpr std::uint32_t kMaxRecord = 1u << 20;

enum Error : std::int32_t { kOk = 0, kBadFraming = 1, kBadCrc = 2, kBadRecord = 3, kBadRange = 4 };
enum RowType : std::uint8_t { kDecision = 1, kImpression = 2, kClick = 3, kServed = 4 };

struct Strings {
  std::vector<std::int32_t> offsets{0};
  std::string data;
  void add(std::string_view s) {
    data.append(s);
    offsets.push_back(static_cast<std::int32_t>(data.size()));
  }
};

struct Reader {
  const unsigned char* p;
  std::size_t n;
  std::size_t pos = 0;
  bool ok = true;
  template <typename T>
  T num() {
    T v{};
    if (pos + sizeof(T) > n) {
      ok = false;
      return v;
    }
    std::memcpy(&v, p + pos, sizeof(T));  // little-endian host (x86-64, as the engine)
    pos += sizeof(T);
    return v;
  }
  std::string_view text() {
    const auto len = num<std::uint16_t>();
    if (!ok || pos + len > n) {
      ok = false;
      return {};
    }
    std::string_view s(reinterpret_cast<const char*>(p + pos), len);
    pos += len;
    if (!adpop::json::valid_utf8(s)) ok = false;
    return s;
  }
};

}  // namespace

struct AdpopColumns {
  std::uint64_t rows = 0;
  const std::uint8_t* type = nullptr;
  const std::int64_t* time_ms = nullptr;
  const std::uint64_t* offset = nullptr;
  const std::uint32_t* idx = nullptr;
  const std::uint32_t* slot = nullptr;
  const std::uint32_t* version = nullptr;
  const std::uint64_t* request_hash = nullptr;
  const std::uint16_t* ads = nullptr;
  const std::uint64_t* key_hi = nullptr;
  const std::uint64_t* key_lo = nullptr;
  // campaign, ad, placement, request id: Arrow's string layout (offsets, then bytes)
  const std::int32_t* str_offsets[4] = {};
  const char* str_data[4] = {};
  std::uint64_t str_bytes[4] = {};
  std::int64_t min_time = 0;
  std::int64_t max_time = 0;
  std::int32_t error = 0;
  std::uint64_t error_at = 0;  // the segment offset of the record at fault
  void* owner = nullptr;
};

namespace {

struct Owner {
  std::vector<std::uint8_t> type;
  std::vector<std::int64_t> time_ms;
  std::vector<std::uint64_t> offset, request_hash, key_hi, key_lo;
  std::vector<std::uint32_t> idx, slot, version;
  std::vector<std::uint16_t> ads;
  Strings str[4];
  std::string identity;

  void key(std::string_view text) {
    adpop::Sha256 h;
    h.update(text.data(), text.size());
    std::uint8_t out[32];
    h.finish(out);
    std::uint64_t hi = 0, lo = 0;
    for (int i = 0; i < 8; ++i) hi = hi << 8 | out[i];
    for (int i = 8; i < 16; ++i) lo = lo << 8 | out[i];
    key_hi.push_back(hi);
    key_lo.push_back(lo);
  }
  void row(std::uint8_t t, std::int64_t time, std::uint64_t off, std::uint32_t i, std::uint32_t s,
           std::uint32_t v, std::uint64_t hash, std::uint16_t n, std::string_view campaign,
           std::string_view ad, std::string_view placement, std::string_view request_id) {
    type.push_back(t);
    time_ms.push_back(time);
    offset.push_back(off);
    idx.push_back(i);
    slot.push_back(s);
    version.push_back(v);
    request_hash.push_back(hash);
    ads.push_back(n);
    str[0].add(campaign);
    str[1].add(ad);
    str[2].add(placement);
    str[3].add(request_id);
  }
};

void join(std::string& out, std::initializer_list<std::string_view> parts) {
  out.clear();
  bool first = true;
  for (std::string_view part : parts) {
    if (!first) out.push_back('\x1f');
    first = false;
    out.append(part);
  }
}

}  // namespace

extern "C" {

// Decodes the records framed in data[0, n), which start at segment offset `base`.
// Returns the error (0: none); the columns stay valid until adpop_free.
std::int32_t adpop_decode(const unsigned char* data, std::uint64_t n, std::uint64_t base, const char* pop,
                          std::uint32_t pop_len, const char* segment, std::uint32_t segment_len,
                          AdpopColumns* out) {
  auto* own = new Owner();
  out->owner = own;
  const std::string_view pop_id(pop, pop_len), seg(segment, segment_len);
  std::int64_t min_time = INT64_MAX, max_time = INT64_MIN;
  std::string& id = own->identity;
  std::size_t pos = 0;
  auto fail = [&](Error e, std::size_t at) {
    out->error = e;
    out->error_at = base + at;
    return e;
  };
  while (pos < n) {
    if (pos + 8 > n) return fail(kBadFraming, pos);
    std::uint32_t length, crc;
    std::memcpy(&length, data + pos, 4);
    std::memcpy(&crc, data + pos + 4, 4);
    if (length > kMaxRecord || pos + 8 + length > n) return fail(kBadFraming, pos);
    const unsigned char* body = data + pos + 8;
    if (adpop::crc32c(body, length) != crc) return fail(kBadCrc, pos);
    Reader r{body, length};
    const auto kind = r.num<std::uint8_t>();
    const auto time = static_cast<std::int64_t>(r.num<std::uint64_t>());
    const std::uint64_t offset = base + pos;
    const std::string off_text = std::to_string(offset);
    if (!r.ok) return fail(kBadRecord, pos);
    if (kind == 2 || kind == 3) {
      const auto campaign = r.text(), ad = r.text(), placement = r.text();
      const auto lo = r.num<std::uint32_t>(), hi = r.num<std::uint32_t>(), version = r.num<std::uint32_t>();
      if (!r.ok || r.pos != length) return fail(kBadRecord, pos);
      const std::uint64_t hash = std::uint64_t{hi} << 32 | lo;
      if (kind == 2)
        join(id, {"impression", std::to_string(hash), campaign, ad, placement});
      else
        join(id, {"record", pop_id, seg, off_text});
      own->key(id);
      own->row(kind == 2 ? kImpression : kClick, time, offset, 0, 0, version, hash, 0, campaign, ad,
               placement, {});
    } else if (kind == 1) {
      const auto request_id = r.text();
      r.text();  // the user key: not stored
      const auto version = r.num<std::uint32_t>(), placements = r.num<std::uint32_t>();
      if (!r.ok) return fail(kBadRecord, pos);
      std::uint32_t served = 0;
      for (std::uint32_t i = 0; i < placements && r.ok; ++i) {
        const auto placement = r.text();
        const auto count = r.num<std::uint32_t>();
        for (std::uint32_t s = 0; s < count && r.ok; ++s) {
          const auto campaign = r.text(), ad = r.text();
          if (!r.ok) break;
          join(id, {"served", pop_id, seg, off_text, std::to_string(i), std::to_string(s)});
          own->key(id);
          own->row(kServed, time, offset, i, s, version, 0, 0, campaign, ad, placement, request_id);
          ++served;
        }
      }
      if (!r.ok || r.pos != length) return fail(kBadRecord, pos);
      join(id, {"record", pop_id, seg, off_text});
      own->key(id);
      own->row(kDecision, time, offset, 0, 0, version, 0,
               static_cast<std::uint16_t>(served > 65535 ? 65535 : served), {}, {}, {}, request_id);
    } else {
      return fail(kBadRecord, pos);
    }
    if (time < min_time) min_time = time;
    if (time > max_time) max_time = time;
    pos += 8 + length;
  }
  out->rows = own->type.size();
  out->type = own->type.data();
  out->time_ms = own->time_ms.data();
  out->offset = own->offset.data();
  out->idx = own->idx.data();
  out->slot = own->slot.data();
  out->version = own->version.data();
  out->request_hash = own->request_hash.data();
  out->ads = own->ads.data();
  out->key_hi = own->key_hi.data();
  out->key_lo = own->key_lo.data();
  for (int i = 0; i < 4; ++i) {
    out->str_offsets[i] = own->str[i].offsets.data();
    out->str_data[i] = own->str[i].data.data();
    out->str_bytes[i] = own->str[i].data.size();
  }
  out->min_time = min_time;
  out->max_time = max_time;
  return kOk;
}

void adpop_free(AdpopColumns* out) {
  delete static_cast<Owner*>(out->owner);
  out->owner = nullptr;
}

}  // extern "C"
