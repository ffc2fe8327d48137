// HTTP/1.1 request parsing for the serving port: incremental (called again as bytes arrive),
// pipelining-aware (reports how many bytes one request used), bounded, no allocation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace adpop::http {

struct Limits {
  std::size_t max_header_bytes = 8192;  // request line + headers; over: 431
  std::size_t max_body_bytes = 65536;   // over: 413
  std::size_t max_headers = 64;         // over: 431
};

struct Request {
  std::string_view method;
  std::string_view target;  // path + query as sent
  std::string_view path;
  std::string_view query;  // after '?', may be empty
  std::string_view body;
  std::string_view content_type;
  bool keep_alive = true;
  std::size_t consumed = 0;  // bytes of the buffer this request used (head + body)
};

enum class Status : std::uint8_t { kComplete, kIncomplete, kError };

struct Result {
  Status status = Status::kIncomplete;
  int code = 0;             // for kError: the HTTP status to answer (400, 413, 431, 501, 505)
  const char* reason = "";  // for kError: the counter name, e.g. "bad_request_line"
};

// Parses the first request in `buffer`. kIncomplete: wait for more bytes (the caller
// enforces timeouts). kError: answer `code` and close the connection.
Result parse(std::string_view buffer, const Limits& limits, Request& out);

// Decodes %XX and '+' in a query component into `out` (at least `in.size()` bytes);
// returns the decoded length, or -1 for a bad escape.
long url_decode(std::string_view in, char* out);

}  // namespace adpop::http
