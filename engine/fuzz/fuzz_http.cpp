// libFuzzer target: the HTTP request parser, fed as one buffer and as pipelined requests.
#include <cstddef>
#include <cstdint>
#include <string>

#include "http.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  adpop::http::Limits limits;
  limits.max_header_bytes = 1024;
  limits.max_body_bytes = 4096;
  // Parse pipelined requests until the buffer is used up or refused, as a connection would.
  for (int i = 0; i < 64 && !rest.empty(); ++i) {
    adpop::http::Request req;
    adpop::http::Result r = adpop::http::parse(rest, limits, req);
    if (r.status != adpop::http::Status::kComplete) break;
    if (req.consumed == 0 || req.consumed > rest.size()) __builtin_trap();  // must advance, in bounds
    if (!req.query.empty()) {
      std::string out(req.query.size(), '\0');
      (void)adpop::http::url_decode(req.query, out.data());
    }
    rest.remove_prefix(req.consumed);
  }
  return 0;
}
