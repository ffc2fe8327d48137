// libFuzzer target: the /v1/decide request parsers (JSON body and query string).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "api.hpp"
#include "json.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // The engine parses bodies in place, so the fuzzer hands it a mutable copy.
  std::vector<char> body(data, data + size);
  adpop::json::Document doc;
  adpop::DecideRequest request;
  const char* error = nullptr;
  if (adpop::api::parse_json(body.data(), body.size(), doc, request, &error)) {
    if (request.placements.empty() || request.placements.size() > adpop::kMaxPlacements) __builtin_trap();
    for (const auto& p : request.placements)
      if (p.count < 1 || p.count > adpop::kMaxAdsPerPlacement) __builtin_trap();
  }
  std::string scratch;
  (void)adpop::api::parse_query(std::string_view(reinterpret_cast<const char*>(data), size), scratch, request,
                                &error);
  return 0;
}
