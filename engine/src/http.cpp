#include "http.hpp"

#include <array>
#include <cstring>

namespace adpop::http {

namespace {

// RFC 9110 tchar, as a table: checked for every byte of every method and header name.
constexpr std::array<bool, 256> kTokenChars = [] {
  std::array<bool, 256> t{};
  for (int c = '0'; c <= '9'; ++c) t[c] = true;
  for (int c = 'a'; c <= 'z'; ++c) t[c] = true;
  for (int c = 'A'; c <= 'Z'; ++c) t[c] = true;
  for (char c : std::string_view("!#$%&'*+-.^_`|~")) t[static_cast<unsigned char>(c)] = true;
  return t;
}();

bool is_token_char(unsigned char c) {
  return kTokenChars[c];
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    char x = a[i], y = b[i];
    if (x >= 'A' && x <= 'Z') x = static_cast<char>(x + 32);
    if (y >= 'A' && y <= 'Z') y = static_cast<char>(y + 32);
    if (x != y) return false;
  }
  return true;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

Result error(int code, const char* reason) {
  return Result{Status::kError, code, reason};
}

}  // namespace

Result parse(std::string_view buffer, const Limits& limits, Request& out) {
  out = Request{};
  // Find the end of the head; tolerate bare LF line endings as RFC 9112 allows.
  std::size_t head_end = std::string_view::npos;
  std::size_t body_start = 0;
  const std::size_t scan =
      buffer.size() < limits.max_header_bytes + 4 ? buffer.size() : limits.max_header_bytes + 4;
  // Line ends found with memchr: heads are a few short lines, and it skips a line at a time.
  for (std::size_t i = 0; i < scan; ++i) {
    const void* nl = std::memchr(buffer.data() + i, '\n', scan - i);
    if (!nl) break;
    i = static_cast<std::size_t>(static_cast<const char*>(nl) - buffer.data());
    if (i + 1 < buffer.size() && buffer[i + 1] == '\n') {
      head_end = i;
      body_start = i + 2;
      break;
    }
    if (i + 2 < buffer.size() && buffer[i + 1] == '\r' && buffer[i + 2] == '\n') {
      head_end = i;
      body_start = i + 3;
      break;
    }
  }
  if (head_end == std::string_view::npos) {
    if (buffer.size() > limits.max_header_bytes) return error(431, "headers_too_large");
    // Reject garbage early instead of waiting for a head that will never be valid.
    for (std::size_t i = 0; i < buffer.size() && buffer[i] != ' ' && buffer[i] != '\r' && buffer[i] != '\n';
         ++i)
      if (!is_token_char(static_cast<unsigned char>(buffer[i]))) return error(400, "bad_request_line");
    return Result{};
  }
  if (body_start - 1 > limits.max_header_bytes) return error(431, "headers_too_large");
  std::string_view head = buffer.substr(0, head_end);

  // Request line.
  std::size_t eol = head.find('\n');
  std::string_view line = head.substr(0, eol);
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  std::size_t sp1 = line.find(' ');
  if (sp1 == std::string_view::npos || sp1 == 0) return error(400, "bad_request_line");
  std::size_t sp2 = line.find(' ', sp1 + 1);
  if (sp2 == std::string_view::npos || sp2 == sp1 + 1) return error(400, "bad_request_line");
  out.method = line.substr(0, sp1);
  for (char c : out.method)
    if (!is_token_char(static_cast<unsigned char>(c))) return error(400, "bad_request_line");
  out.target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  std::string_view version = line.substr(sp2 + 1);
  if (out.target.empty() || out.target.front() != '/') return error(400, "bad_request_line");
  // No early exit, so the compiler checks the target many bytes at a time.
  bool control = false;
  for (char c : out.target) control |= static_cast<unsigned char>(c) <= 0x20 || c == 0x7f;
  if (control) return error(400, "bad_request_line");
  if (version == "HTTP/1.1")
    out.keep_alive = true;
  else if (version == "HTTP/1.0")
    out.keep_alive = false;
  else if (version.substr(0, 5) == "HTTP/")
    return error(505, "bad_version");
  else
    return error(400, "bad_request_line");
  std::size_t q = out.target.find('?');
  out.path = out.target.substr(0, q);
  out.query = q == std::string_view::npos ? std::string_view{} : out.target.substr(q + 1);

  // Headers.
  std::size_t content_length = 0;
  bool have_length = false;
  std::size_t headers = 0;
  std::string_view rest = eol == std::string_view::npos ? std::string_view{} : head.substr(eol + 1);
  while (!rest.empty()) {
    std::size_t nl = rest.find('\n');
    std::string_view h = rest.substr(0, nl);
    rest = nl == std::string_view::npos ? std::string_view{} : rest.substr(nl + 1);
    if (!h.empty() && h.back() == '\r') h.remove_suffix(1);
    if (h.empty()) continue;
    if (++headers > limits.max_headers) return error(431, "too_many_headers");
    if (h.front() == ' ' || h.front() == '\t') return error(400, "bad_header");  // obs-fold
    std::size_t colon = h.find(':');
    if (colon == std::string_view::npos || colon == 0) return error(400, "bad_header");
    std::string_view name = h.substr(0, colon);
    for (char c : name)
      if (!is_token_char(static_cast<unsigned char>(c))) return error(400, "bad_header");
    std::string_view value = trim(h.substr(colon + 1));
    if (iequals(name, "content-length")) {
      if (value.empty() || value.size() > 18) return error(400, "bad_content_length");
      std::size_t n = 0;
      for (char c : value) {
        if (c < '0' || c > '9') return error(400, "bad_content_length");
        n = n * 10 + static_cast<std::size_t>(c - '0');
      }
      // Two different lengths is a request-smuggling attempt.
      if (have_length && n != content_length) return error(400, "bad_content_length");
      content_length = n;
      have_length = true;
    } else if (iequals(name, "transfer-encoding")) {
      return error(501, "transfer_encoding");
    } else if (iequals(name, "connection")) {
      if (iequals(value, "close"))
        out.keep_alive = false;
      else if (iequals(value, "keep-alive"))
        out.keep_alive = true;
    } else if (iequals(name, "content-type")) {
      out.content_type = value;
    }
  }
  if (content_length > limits.max_body_bytes) return error(413, "body_too_large");
  if (buffer.size() - body_start < content_length) return Result{};
  out.body = buffer.substr(body_start, content_length);
  out.consumed = body_start + content_length;
  return Result{Status::kComplete, 0, ""};
}

long url_decode(std::string_view in, char* out) {
  long n = 0;
  for (std::size_t i = 0; i < in.size(); ++i) {
    char c = in[i];
    if (c == '+') {
      out[n++] = ' ';
    } else if (c == '%') {
      if (i + 2 >= in.size()) return -1;
      auto hex = [](char h) -> int {
        if (h >= '0' && h <= '9') return h - '0';
        if (h >= 'a' && h <= 'f') return h - 'a' + 10;
        if (h >= 'A' && h <= 'F') return h - 'A' + 10;
        return -1;
      };
      int hi = hex(in[i + 1]), lo = hex(in[i + 2]);
      if (hi < 0 || lo < 0) return -1;
      out[n++] = static_cast<char>(hi << 4 | lo);
      i += 2;
    } else {
      out[n++] = c;
    }
  }
  return n;
}

}  // namespace adpop::http
