// HTTP parser: complete, split at every byte, pipelined, and refused requests.
#include <gtest/gtest.h>

#include <string>

#include "http.hpp"

namespace adpop::http {
namespace {

const std::string kPost =
    "POST /v1/decide?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n"
    "Content-Type: application/json\r\n\r\n{\"id\":\"r\"}";

TEST(HttpParse, CompleteRequest) {
  Request r;
  Result res = parse(kPost, Limits{}, r);
  ASSERT_EQ(res.status, Status::kComplete);
  EXPECT_EQ(r.method, "POST");
  EXPECT_EQ(r.path, "/v1/decide");
  EXPECT_EQ(r.query, "x=1");
  EXPECT_EQ(r.body, "{\"id\":\"r\"}");
  EXPECT_EQ(r.content_type, "application/json");
  EXPECT_TRUE(r.keep_alive);
  EXPECT_EQ(r.consumed, kPost.size());
}

TEST(HttpParse, EverySplitPointIsIncompleteUntilTheEnd) {
  for (std::size_t cut = 0; cut < kPost.size(); ++cut) {
    Request r;
    Result res = parse(std::string_view(kPost).substr(0, cut), Limits{}, r);
    EXPECT_EQ(res.status, Status::kIncomplete) << "cut at " << cut;
  }
}

TEST(HttpParse, PipelinedRequestsParseOneAfterAnother) {
  std::string three = kPost + "GET /healthz HTTP/1.1\r\n\r\n" + kPost;
  std::string_view rest = three;
  std::vector<std::string> paths;
  while (!rest.empty()) {
    Request r;
    ASSERT_EQ(parse(rest, Limits{}, r).status, Status::kComplete);
    paths.emplace_back(r.path);
    rest.remove_prefix(r.consumed);
  }
  EXPECT_EQ(paths, (std::vector<std::string>{"/v1/decide", "/healthz", "/v1/decide"}));
}

TEST(HttpParse, Http10ClosesAndConnectionHeaderWins) {
  Request r;
  ASSERT_EQ(parse("GET / HTTP/1.0\r\n\r\n", Limits{}, r).status, Status::kComplete);
  EXPECT_FALSE(r.keep_alive);
  ASSERT_EQ(parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n", Limits{}, r).status, Status::kComplete);
  EXPECT_FALSE(r.keep_alive);
  ASSERT_EQ(parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", Limits{}, r).status, Status::kComplete);
  EXPECT_TRUE(r.keep_alive);
}

struct Refusal {
  std::string input;
  int code;
  std::string reason;
};

TEST(HttpParse, RefusalsCarryTheirCode) {
  Limits limits;
  limits.max_header_bytes = 200;
  limits.max_body_bytes = 50;
  limits.max_headers = 5;
  const Refusal table[] = {
      {"G\x01T / HTTP/1.1\r\n\r\n", 400, "bad_request_line"},
      {"GET\r\n\r\n", 400, "bad_request_line"},
      {"GET nopath HTTP/1.1\r\n\r\n", 400, "bad_request_line"},
      {"GET / HTTP/2.0\r\n\r\n", 505, "bad_version"},
      {"GET / FTP/1.1\r\n\r\n", 400, "bad_request_line"},
      {"GET / HTTP/1.1\r\nX: " + std::string(300, 'a') + "\r\n\r\n", 431, "headers_too_large"},
      {"GET / HTTP/1.1\r\nX: " + std::string(300, 'a'), 431, "headers_too_large"},
      {"GET / HTTP/1.1\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\nE: 1\r\nF: 1\r\n\r\n", 431, "too_many_headers"},
      {"GET / HTTP/1.1\r\n folded\r\n\r\n", 400, "bad_header"},
      {"GET / HTTP/1.1\r\nnocolon\r\n\r\n", 400, "bad_header"},
      {"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400, "bad_header"},
      {"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400, "bad_content_length"},
      {"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "bad_content_length"},
      {"POST / HTTP/1.1\r\nContent-Length: 51\r\n\r\n", 413, "body_too_large"},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501, "transfer_encoding"},
      {"\x16\x03\x01\x02\x00", 400, "bad_request_line"},                      // a TLS hello on the plain port
      {std::string("G\0T / HTTP/1.1\r\n\r\n", 18), 400, "bad_request_line"},  // NUL in the method
  };
  for (const auto& t : table) {
    Request r;
    Result res = parse(t.input, limits, r);
    EXPECT_EQ(res.status, Status::kError) << t.input;
    EXPECT_EQ(res.code, t.code) << t.input;
    EXPECT_EQ(std::string(res.reason), t.reason) << t.input;
  }
}

TEST(HttpParse, UrlDecode) {
  char out[64];
  EXPECT_EQ(url_decode("a%20b+c", out), 5);
  EXPECT_EQ(std::string(out, 5), "a b c");
  EXPECT_EQ(url_decode("%zz", out), -1);
  EXPECT_EQ(url_decode("%4", out), -1);
  EXPECT_EQ(url_decode("%", out), -1);
}

}  // namespace
}  // namespace adpop::http
