// What each path answers on the serving and metrics addresses: health, metrics, decisions,
// and the impression and click pixels (recorded in the spool before their answers leave).
#include <cstdio>
#include <string>
#include <string_view>
#include <utility>

#include "api.hpp"
#include "response.hpp"
#include "server.hpp"
#include "shard_conn.hpp"

namespace adpop {

namespace {

// The ad named by (campaign id, ad id) in `snap`, or -1. Campaigns are sorted by id and
// each owns a short run of ads, so this is a binary search and a tiny scan.
std::int64_t find_ad(const Snapshot& snap, std::string_view campaign, std::string_view ad) {
  const auto campaigns = snap.campaigns();
  const std::int64_t found = find_by_id(snap, campaigns, campaign);
  if (found < 0) return -1;
  const auto c = campaigns[static_cast<std::uint32_t>(found)];
  const auto ads = snap.ads();
  for (std::uint32_t a = c.getAdsStart(); a < c.getAdsStart() + c.getAdsCount(); ++a)
    if (compare_bytes(snap.str(ads[a].getId()), ad) == 0) return a;
  return -1;
}

std::string_view query_param(std::string_view query, std::string_view name) {
  while (!query.empty()) {
    std::size_t amp = query.find('&');
    std::string_view pair = query.substr(0, amp);
    if (pair.size() > name.size() && pair.substr(0, name.size()) == name && pair[name.size()] == '=')
      return pair.substr(name.size() + 1);
    if (amp == std::string_view::npos) break;
    query.remove_prefix(amp + 1);
  }
  return {};
}

}  // namespace

void Shard::handle(Conn& c, const http::Request& req, const Snapshot* snap) {
  const bool draining = engine_.draining();
  const bool close = !req.keep_alive || draining;
  // The metrics address answers scrapes and health only; the serving addresses never show
  // the PoP's internals to the internet.
  if (req.path != "/healthz" && c.metrics_only != (req.path == "/metrics")) {
    stats_.requests[kRouteOther].add();
    return respond_error(c, 404, kErrNotFound);
  }
  if (req.path == "/healthz") {
    stats_.requests[kRouteHealthz].add();
    if (req.method != "GET" && req.method != "HEAD") return respond_error(c, 405, kErrMethod);
    const std::string_view health = Engine::health(snap, draining);
    if (health != "ok") {
      std::string text(health);
      text += '\n';
      append_response(c.out, 503, "text/plain", text, close);
    } else {
      append_response(c.out, 200, "text/plain", "ok\n", close);
    }
    return;
  }
  if (req.path == "/metrics") {
    stats_.requests[kRouteMetrics].add();
    if (req.method != "GET") return respond_error(c, 405, kErrMethod);
    append_response(c.out, 200, "text/plain; version=0.0.4", engine_.metrics_text(), close);
    return;
  }
  if (req.path == "/v1/decide") {
    const bool post = req.method == "POST";
    // A request parked for the cache and processed again was counted the first time.
    if (!std::exchange(c.resumed, false)) stats_.requests[post ? kRouteDecidePost : kRouteDecideGet].add();
    if (!post && req.method != "GET") return respond_error(c, 405, kErrMethod);
    if (!snap) return respond_error(c, 503, kErrNoSnapshot);
    if (draining && c.accepted_draining) return respond_error(c, 503, kErrDraining);
    return handle_decide(c, req, *snap, close);
  }
  if (req.path == "/v1/e/imp" || req.path == "/v1/e/click") {
    const bool click = req.path == "/v1/e/click";
    stats_.requests[click ? kRouteClick : kRouteImpression].add();
    if (req.method != "GET") return respond_error(c, 405, kErrMethod);
    return handle_tracking(c, req, snap, click, close);
  }
  stats_.requests[kRouteOther].add();
  respond_error(c, 404, kErrNotFound);
}

void Shard::handle_decide(Conn& c, const http::Request& req, const Snapshot& snap, bool close) {
  const bool post = req.method == "POST";
  const char* error = "invalid request";
  bool ok;
  if (post) {
    // Parse in place: the body lives in this connection's input buffer. With a cache the
    // request may be parked and read again, so it is parsed from a copy instead.
    char* body = c.in.data() + (req.body.data() - c.in.data());
    if (cache_) {
      json_copy_.assign(req.body);
      body = json_copy_.data();
    }
    ok = api::parse_json(body, req.body.size(), doc_, request_, &error);
  } else {
    ok = api::parse_query(req.query, scratch_, request_, &error);
  }
  if (!ok) {
    stats_.errors[post ? kErrBadJson : kErrBadField].add();
    std::string msg = "{\"error\":";
    api::append_json_string(msg, error);
    msg += "}";
    append_response(c.out, 400, "application/json", msg, close);
    return;
  }
  if (request_.explain) return respond_error(c, 403, kErrExplainForbidden);
  bool degraded = false;
  const std::vector<CapEntry>* users = nullptr;
  if (cache_ && request_.caps.empty() && !request_.user_key.empty()) {
    users = user_caps(c, snap, request_.user_key, &degraded);
    if (!users) return;  // parked until the user's counters come
  }
  // Room for the decision's record first: an answer the spool cannot record is no-fill.
  if (!may_record(kDecisionRecordBytes, true)) return respond_spool_full(c, close);
  const std::int64_t now = batch_wall_ms_ / 1000;
  const DecideContext context{&engine_.signer(), &pacer_, batch_wall_ms_, users};
  const std::uint64_t asked = pacer_.asked();
  decider_.decide(snap, request_, now, decision_, context);
  // Paced while the cache cannot keep what it spends, or capped without the user's counters:
  // served from memory, and counted.
  if (cache_ && (degraded || (pacer_.asked() != asked && !cache_->up()))) stats_.counts[kCacheDegraded].add();
  if (users && decision_.caps_counted) keep_user_caps(request_.user_key);
  if (decision_.caps_rejected) stats_.counts[kCapsRejected].add();
  const auto campaigns = snap.campaigns();
  const auto ads = snap.ads();
  // One decision record per answer, written before the answer is sent.
  spool_->begin(EventType::kDecision, static_cast<std::uint64_t>(batch_wall_ms_));
  spool_->put_string(request_.id);
  spool_->put_string(request_.user_key);
  spool_->put_u32(static_cast<std::uint32_t>(snap.version()));
  spool_->put_u32(static_cast<std::uint32_t>(decision_.placements.size()));
  for (std::size_t i = 0; i < decision_.placements.size(); ++i) {
    const auto& pd = decision_.placements[i];
    if (pd.chosen.empty()) stats_.counts[kNoFill].add();
    spool_->put_string(request_.placements[i].id);
    spool_->put_u32(static_cast<std::uint32_t>(pd.chosen.size()));
    for (const auto& ch : pd.chosen) {
      spool_->put_string(snap.str(campaigns[ch.campaign].getId()));
      spool_->put_string(snap.str(ads[ch.ad].getId()));
    }
  }
  spool_->end();
  body_.clear();  // reused: no allocation per answer once warm
  api::TrackingLinks links{&engine_.signer(),
                           static_cast<std::uint32_t>(now) + engine_.options().token_ttl_s};
  api::render(snap, request_, decision_, body_, engine_.signer().usable() ? &links : nullptr, &fragments_);
  append_response(c.out, 200, "application/json", body_, close);
}

void Shard::handle_tracking(Conn& c, const http::Request& req, const Snapshot* snap, bool click, bool close) {
  TrackingToken token;
  const auto now = static_cast<std::uint32_t>(batch_wall_ms_ / 1000);
  std::string_view text = query_param(req.query, "t");
  TokenError err = engine_.signer().usable() ? engine_.signer().verify(text, now, token_scratch_, token)
                                             : TokenError::kForged;
  if (err == TokenError::kNone && (token.kind == TokenKind::kClick) != click) err = TokenError::kMalformed;
  if (err == TokenError::kMalformed) return respond_error(c, 403, kErrTokenMalformed);
  if (err == TokenError::kForged) return respond_error(c, 403, kErrTokenForged);
  if (err == TokenError::kExpired) return respond_error(c, 403, kErrTokenExpired);
  // Refused before the dedup window sees it, so the pixel's retry is recorded later.
  const std::size_t record =
      8 + 1 + 8 + 3 * 2 + token.campaign.size() + token.ad.size() + token.placement.size() + 12;
  if (!may_record(record, false)) {
    stats_.counts[kSpoolFullRefused].add();
    return respond_error(c, 503, kErrSpoolFull);
  }
  if (!click) {
    // One impression per request and ad: retries and double-fired pixels count once.
    std::uint64_t key = token.request_hash ^ (request_hash(token.ad) * 0x9E3779B97F4A7C15ULL);
    if (engine_.dedup().seen(key, now, engine_.options().dedup_window_s)) {
      stats_.counts[kImpressionsDuplicate].add();
    } else {
      stats_.counts[kImpressions].add();
      spool_tracking(EventType::kImpression, token);
      charge(snap, token);
      if (cache_) dedup_keys_.push_back(key);
    }
    append_response(c.out, 204, "text/plain", "", close);
    return;
  }
  if (!snap) return respond_error(c, 503, kErrNoSnapshot);
  std::int64_t ad = find_ad(*snap, token.campaign, token.ad);
  if (ad < 0) return respond_error(c, 404, kErrUnknownAd);
  const auto creative = snap->creatives()[snap->ads()[static_cast<std::uint32_t>(ad)].getCreative()];
  const std::string_view landing = snap->str(creative.getLandingUrl());
  stats_.counts[kClicks].add();
  spool_tracking(EventType::kClick, token);
  char head[160];
  int n = std::snprintf(head, sizeof head, "HTTP/1.1 302 Found\r\nContent-Length: 0\r\n%sLocation: ",
                        close ? "Connection: close\r\n" : "");
  c.out.append(head, static_cast<std::size_t>(n));
  // The landing URL comes from a validated, signed snapshot; CR/LF cannot reach the header.
  for (char ch : landing)
    if (ch != '\r' && ch != '\n') c.out.push_back(ch);
  c.out += "\r\n\r\n";
}

// Spend is charged when the ad is shown, at the price of the campaign in the serving
// snapshot (the origin prices the stored event at the version that served it).
void Shard::charge(const Snapshot* snap, const TrackingToken& token) {
  if (!snap) return;
  const auto campaigns = snap->campaigns();
  const std::int64_t found = find_by_id(*snap, campaigns, token.campaign);
  if (found < 0) return;
  const auto camp = campaigns[static_cast<std::uint32_t>(found)];
  if (camp.getBudgetDailyMicros() == 0 && camp.getBudgetTotalMicros() == 0) return;
  pacer_.charge(camp.getIdHash(), camp.getEcpmMicros() / 1000, batch_wall_ms_);
}

// Impression and click records share one layout (engine/SPOOL.md).
void Shard::spool_tracking(EventType type, const TrackingToken& token) {
  spool_->begin(type, static_cast<std::uint64_t>(batch_wall_ms_));
  spool_->put_string(token.campaign);
  spool_->put_string(token.ad);
  spool_->put_string(token.placement);
  spool_->put_u32(static_cast<std::uint32_t>(token.request_hash));
  spool_->put_u32(static_cast<std::uint32_t>(token.request_hash >> 32));
  spool_->put_u32(token.version);
  spool_->end();
}

bool Shard::may_record(std::size_t bytes, bool decision) {
  if (!spool_->enabled()) return true;
  const EngineOptions& o = engine_.options();
  // Decisions stop while the headroom is still free, so the pixels of ads already served
  // find room: the bound on the backlog, and the space on disk.
  const std::uint64_t keep = decision ? o.spool_headroom_bytes : 0;
  bool ok = o.spool_max_bytes == 0 || engine_.spool_backlog() + keep * o.shards + bytes <= o.spool_max_bytes;
  ok = ok && spool_->room(bytes, keep, batch_wall_ms_ / 1000);
  if (decision) stats_.counts[kSpoolShedding].set(ok ? 0 : 1);
  return ok;
}

void Shard::respond_spool_full(Conn& c, bool close) {
  stats_.counts[kSpoolFullNoFill].add();
  stats_.counts[kNoFill].add(request_.placements.size());
  body_.clear();
  body_ += "{\"id\":";
  api::append_json_string(body_, request_.id);
  body_ += ",\"placements\":[";
  for (std::size_t i = 0; i < request_.placements.size(); ++i) {
    if (i) body_.push_back(',');
    body_ += "{\"id\":";
    api::append_json_string(body_, request_.placements[i].id);
    body_ += ",\"ads\":[]}";
  }
  body_ += "],\"no_fill\":\"spool_full\"}";
  append_response(c.out, 200, "application/json", body_, close);
}

bool Shard::flush_spool(std::int64_t now_s) {
  const bool written = spool_->flush(now_s);
  const SpoolStats& st = spool_->stats();
  stats_.counts[kSpoolRecords].set(st.records);
  stats_.counts[kSpoolWriteErrors].set(st.write_errors);
  stats_.counts[kSpoolDropped].set(st.disabled_dropped);
  stats_.counts[kSpoolSegmentsClosed].set(st.segments_closed);
  return written;
}

}  // namespace adpop
