#include "api.hpp"

#include <charconv>
#include <cstdio>

#include "http.hpp"

namespace adpop::api {

namespace {

constexpr std::size_t kMaxListValues = 64;
constexpr std::size_t kMaxSizes = 16;

bool parse_size(std::string_view s, AdSize* out) {
  std::size_t x = s.find('x');
  if (x == std::string_view::npos || x == 0 || x + 1 >= s.size()) return false;
  unsigned w = 0, h = 0;
  auto r1 = std::from_chars(s.data(), s.data() + x, w);
  auto r2 = std::from_chars(s.data() + x + 1, s.data() + s.size(), h);
  if (r1.ec != std::errc{} || r1.ptr != s.data() + x || r2.ec != std::errc{} ||
      r2.ptr != s.data() + s.size() || w == 0 || h == 0 || w > 65535 || h > 65535)
    return false;
  *out = AdSize{static_cast<std::uint16_t>(w), static_cast<std::uint16_t>(h)};
  return true;
}

bool parse_int(std::string_view s, std::int64_t* out) {
  auto r = std::from_chars(s.data(), s.data() + s.size(), *out);
  return r.ec == std::errc{} && r.ptr == s.data() + s.size();
}

// Reads a string member if present; false if present with another type.
bool get_string(const json::Document& doc, const json::Value& obj, std::string_view name,
                std::string_view* out, std::size_t limit = 256) {
  const json::Value* v = doc.member(obj, name);
  if (!v || v->type == json::Type::kNull) return true;
  if (v->type != json::Type::kString || v->text.size() > limit) return false;
  *out = v->text;
  return true;
}

bool get_strings(const json::Document& doc, const json::Value& obj, std::string_view name,
                 std::vector<std::string_view>* out) {
  const json::Value* v = doc.member(obj, name);
  if (!v || v->type == json::Type::kNull) return true;
  if (v->type != json::Type::kArray || v->count > kMaxListValues) return false;
  bool ok = true;
  doc.each(*v, [&](const json::Value& item) {
    if (item.type != json::Type::kString || item.text.size() > 256)
      ok = false;
    else
      out->push_back(item.text);
  });
  return ok;
}

void split_list(std::string_view s, std::vector<std::string_view>* out) {
  while (!s.empty() && out->size() < kMaxListValues) {
    std::size_t comma = s.find(',');
    std::string_view item = s.substr(0, comma);
    if (!item.empty()) out->push_back(item);
    if (comma == std::string_view::npos) break;
    s.remove_prefix(comma + 1);
  }
}

}  // namespace

bool parse_json(char* body, std::size_t size, json::Document& doc, DecideRequest& out, const char** error) {
  out.clear();
  json::Limits limits;
  if (!doc.parse(body, size, limits, error)) return false;
  const json::Value& root = doc.root();
  if (root.type != json::Type::kObject) {
    *error = "the request must be a JSON object";
    return false;
  }
  if (!get_string(doc, root, "id", &out.id) || out.id.empty()) {
    *error = "id: a non-empty string is required";
    return false;
  }
  const json::Value* placements = doc.member(root, "placements");
  if (!placements || placements->type != json::Type::kArray || placements->count == 0 ||
      placements->count > kMaxPlacements) {
    *error = "placements: a list of 1 to 20 placements is required";
    return false;
  }
  bool ok = true;
  doc.each(*placements, [&](const json::Value& p) {
    if (!ok) return;
    PlacementRequest pr;
    if (p.type != json::Type::kObject || !get_string(doc, p, "id", &pr.id) || pr.id.empty()) {
      *error = "placements[].id: a non-empty string is required";
      ok = false;
      return;
    }
    if (const json::Value* sizes = doc.member(p, "sizes")) {
      if (sizes->type != json::Type::kArray || sizes->count > kMaxSizes) {
        *error = "placements[].sizes: a list of \"WxH\" strings";
        ok = false;
        return;
      }
      doc.each(*sizes, [&](const json::Value& s) {
        AdSize size;
        if (s.type != json::Type::kString || !parse_size(s.text, &size)) {
          *error = "placements[].sizes: a list of \"WxH\" strings";
          ok = false;
        } else {
          pr.sizes.push_back(size);
        }
      });
    }
    if (const json::Value* count = doc.member(p, "count")) {
      if (count->type != json::Type::kNumber || count->number < 1 || count->number > kMaxAdsPerPlacement ||
          count->number != static_cast<int>(count->number)) {
        *error = "placements[].count: a whole number from 1 to 20";
        ok = false;
        return;
      }
      pr.count = static_cast<std::uint32_t>(count->number);
    }
    out.placements.push_back(std::move(pr));
  });
  if (!ok) return false;
  static const json::Value kEmpty{};
  const json::Value* user = doc.member(root, "user");
  const json::Value* device = doc.member(root, "device");
  const json::Value* geo = doc.member(root, "geo");
  const json::Value* site = doc.member(root, "site");
  for (const json::Value* obj : {user, device, geo, site}) {
    if (obj && obj->type != json::Type::kObject && obj->type != json::Type::kNull) {
      *error = "user, device, geo and site must be objects";
      return false;
    }
  }
  const json::Value& u = user ? *user : kEmpty;
  const json::Value& d = device ? *device : kEmpty;
  const json::Value& g = geo ? *geo : kEmpty;
  const json::Value& s = site ? *site : kEmpty;
  if (!get_string(doc, u, "key", &out.user_key) || !get_strings(doc, u, "segments", &out.segments) ||
      !get_string(doc, d, "type", &out.device) || !get_string(doc, d, "os", &out.os) ||
      !get_string(doc, g, "country", &out.country) || !get_string(doc, g, "region", &out.region) ||
      !get_string(doc, s, "domain", &out.domain) || !get_string(doc, root, "caps", &out.caps, 4096) ||
      !get_strings(doc, root, "keywords", &out.keywords)) {
    *error = "a field has the wrong type (strings, and lists of at most 64 strings)";
    return false;
  }
  if (const json::Value* t = doc.member(root, "time"); t && t->type != json::Type::kNull) {
    if (t->type != json::Type::kNumber || t->number < 0 || t->number > 4102444800.0) {
      *error = "time: unix seconds";
      return false;
    }
    out.time = static_cast<std::int64_t>(t->number);
  }
  if (const json::Value* e = doc.member(root, "explain"); e && e->type != json::Type::kNull) {
    if (e->type != json::Type::kBool) {
      *error = "explain: true or false";
      return false;
    }
    out.explain = e->boolean;
  }
  return true;
}

// Views into `query` (the request buffer) and `scratch`: both must outlive the request.
bool parse_query(std::string_view query, std::string& scratch, DecideRequest& out, const char** error) {
  out.clear();
  // Decoded text never grows, so one buffer of the query's size holds every value; views
  // into it stay valid because it is not resized afterwards.
  scratch.resize(query.size() + 1);
  char* w = scratch.data();
  std::vector<AdSize> sizes;
  std::uint32_t count = 1;
  std::string_view placement_ids[kMaxPlacements];  // on the stack: no allocation per request
  std::size_t placements = 0;
  while (!query.empty()) {
    std::size_t amp = query.find('&');
    std::string_view pair = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view{} : query.substr(amp + 1);
    if (pair.empty()) continue;
    std::size_t eq = pair.find('=');
    std::string_view key = pair.substr(0, eq);
    std::string_view raw = eq == std::string_view::npos ? std::string_view{} : pair.substr(eq + 1);
    std::string_view value = raw;  // most values need no decoding: a view into the request
    // A plain scan: find_first_of calls memchr once per character of `raw`.
    bool escaped = false;
    for (char ch : raw) escaped |= ch == '%' || ch == '+';
    if (escaped) {
      long n = http::url_decode(raw, w);
      if (n < 0) {
        *error = "bad %-escape in the query";
        return false;
      }
      value = std::string_view(w, static_cast<std::size_t>(n));
      w += n;
    }
    // Values reach the event spool and the origin's store, which take only UTF-8 (as the
    // JSON reader does): a request with other bytes is refused, not recorded.
    if (!json::valid_utf8(value)) {
      *error = "invalid UTF-8 in the query";
      return false;
    }
    if (key == "id")
      out.id = value;
    else if (key == "placement") {
      if (placements >= kMaxPlacements) {
        *error = "at most 20 placements";
        return false;
      }
      placement_ids[placements++] = value;
    } else if (key == "sizes") {
      std::vector<std::string_view> items;
      split_list(value, &items);
      for (auto item : items) {
        AdSize size;
        if (!parse_size(item, &size) || sizes.size() >= kMaxSizes) {
          *error = "sizes: comma-separated WxH";
          return false;
        }
        sizes.push_back(size);
      }
    } else if (key == "count") {
      std::int64_t c = 0;
      if (!parse_int(value, &c) || c < 1 || c > kMaxAdsPerPlacement) {
        *error = "count: a whole number from 1 to 20";
        return false;
      }
      count = static_cast<std::uint32_t>(c);
    } else if (key == "user")
      out.user_key = value;
    else if (key == "segments")
      split_list(value, &out.segments);
    else if (key == "keywords")
      split_list(value, &out.keywords);
    else if (key == "device")
      out.device = value;
    else if (key == "os")
      out.os = value;
    else if (key == "country")
      out.country = value;
    else if (key == "region")
      out.region = value;
    else if (key == "domain")
      out.domain = value;
    else if (key == "caps")
      out.caps = value;
    else if (key == "time") {
      if (!parse_int(value, &out.time) || out.time < 0) {
        *error = "time: unix seconds";
        return false;
      }
    }
    // Unknown keys are ignored: tags carry cache-busters and the like.
  }
  if (out.id.empty()) {
    *error = "id: required";
    return false;
  }
  if (placements == 0) {
    *error = "placement: at least one is required";
    return false;
  }
  for (std::size_t i = 0; i < placements; ++i)
    out.placements.push_back(PlacementRequest{placement_ids[i], sizes, count});
  return true;
}

namespace {

// Integers by to_chars: answers are built for every request, and snprintf dominated them.
template <typename T>
void append_number(std::string& out, T value) {
  char buf[24];
  out.append(buf, static_cast<std::size_t>(std::to_chars(buf, buf + sizeof buf, value).ptr - buf));
}

}  // namespace

void append_json_string(std::string& out, std::string_view s) {
  out.push_back('"');
  // Runs of characters that need no escape are appended whole.
  std::size_t start = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c != '"' && c != '\\') continue;
    out.append(s.data() + start, i - start);
    start = i + 1;
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default: {
        static const char kHex[] = "0123456789abcdef";
        const char esc[6] = {'\\', 'u', '0', '0', kHex[c >> 4], kHex[c & 15]};
        out.append(esc, 6);
      }
    }
  }
  out.append(s.data() + start, s.size() - start);
  out.push_back('"');
}

namespace {
// The fixed fields of a chosen ad, from "{" up to (not including) the tracking URLs.
void append_ad_fields(const Snapshot& snap, const Choice& ch, std::string& out) {
  static const char* kKinds[] = {"image", "html", "video", "native"};
  const auto ad = snap.ads()[ch.ad];
  const auto camp = snap.campaigns()[ch.campaign];
  const auto cr = snap.creatives()[ch.creative];
  out += "{\"ad\":";
  append_json_string(out, snap.str(ad.getId()));
  out += ",\"campaign\":";
  append_json_string(out, snap.str(camp.getId()));
  out += ",\"creative\":";
  append_json_string(out, snap.str(cr.getId()));
  out += ",\"size\":\"";
  append_number(out, cr.getWidth());
  out.push_back('x');
  append_number(out, cr.getHeight());
  out += "\",\"priority\":";
  append_number(out, camp.getPriority());
  out += ",\"type\":\"";
  out += kKinds[static_cast<unsigned>(cr.getKind()) & 3];
  out.push_back('"');
  if (cr.getBody() != 0) {
    out += ",\"body\":";
    append_json_string(out, snap.str(cr.getBody()));
  }
  if (cr.getUrl() != 0) {
    out += ",\"url\":";
    append_json_string(out, snap.str(cr.getUrl()));
  }
}
}  // namespace

std::string_view AdFragments::get(const Snapshot& snap, const Choice& choice) {
  if (serial_ != snap.serial() || by_ad_.size() >= kMaxAds) {
    by_ad_.clear();
    serial_ = snap.serial();
  }
  auto [it, added] = by_ad_.try_emplace(choice.ad);
  if (added) append_ad_fields(snap, choice, it->second);
  return it->second;
}

void render(const Snapshot& snap, const DecideRequest& request, const Decision& decision, std::string& out,
            const TrackingLinks* links, AdFragments* fragments) {
  const auto campaigns = snap.campaigns();
  const auto ads = snap.ads();
  const std::uint64_t request_key = request_hash(request.id);
  out += "{\"id\":";
  append_json_string(out, request.id);
  out += ",\"version\":";
  append_number(out, snap.version());
  out += ",\"time\":";
  append_number(out, decision.time);
  out += ",\"placements\":[";
  for (std::size_t i = 0; i < decision.placements.size(); ++i) {
    const PlacementDecision& pd = decision.placements[i];
    if (i) out.push_back(',');
    out += "{\"id\":";
    append_json_string(out, request.placements[i].id);
    if (pd.placement < 0) out += ",\"error\":\"unknown placement\"";
    out += ",\"ads\":[";
    for (std::size_t j = 0; j < pd.chosen.size(); ++j) {
      const Choice& ch = pd.chosen[j];
      if (j) out.push_back(',');
      if (fragments)
        out += fragments->get(snap, ch);
      else
        append_ad_fields(snap, ch, out);
      if (links) {
        TrackingToken token;
        token.expires = links->expires;
        token.request_hash = request_key;
        token.version = static_cast<std::uint32_t>(snap.version());
        token.campaign = snap.str(campaigns[ch.campaign].getId());
        token.ad = snap.str(ads[ch.ad].getId());
        token.placement = request.placements[i].id;
        // Tokens are base64url: safe in a URL and in JSON without escaping.
        const TrackingPair pair(*links->signer, token);
        out += ",\"imp\":\"/v1/e/imp?t=";
        pair.append(TokenKind::kImpression, out);
        out += "\",\"click\":\"/v1/e/click?t=";
        pair.append(TokenKind::kClick, out);
        out.push_back('"');
      }
      out.push_back('}');
    }
    out.push_back(']');
    if (request.explain) {
      out += ",\"explain\":{\"eligible\":[";
      for (std::size_t j = 0; j < pd.eligible.size(); ++j) {
        if (j) out.push_back(',');
        append_json_string(out, snap.str(campaigns[pd.eligible[j]].getId()));
      }
      out += "],\"lost\":[";
      for (std::size_t j = 0; j < pd.losses.size(); ++j) {
        if (j) out.push_back(',');
        out += "{\"campaign\":";
        append_json_string(out, snap.str(campaigns[pd.losses[j].campaign].getId()));
        out += ",\"reason\":\"";
        out += loss_name(pd.losses[j].reason);
        if (pd.losses[j].reason == LossReason::kPacing) {
          out += "\",\"pacing\":\"";
          out += pace_name(pd.losses[j].pacing);
        }
        out += "\"}";
      }
      out += "],\"hour_of_week\":";
      append_number(out, decision.hour_of_week);
      out.push_back('}');
    }
    out.push_back('}');
  }
  out.push_back(']');
  if (!decision.caps.empty()) {
    out += ",\"caps\":\"";
    out += decision.caps;  // base64url: no escaping needed
    out.push_back('"');
  }
  out.push_back('}');
}

}  // namespace adpop::api
