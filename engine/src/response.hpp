// Writing an HTTP/1.1 answer into a connection's output buffer. Inline: every answer of
// every shard goes through it.
#pragma once

#include <charconv>
#include <string>
#include <string_view>

namespace adpop {

inline const char* status_text(int code) {
  switch (code) {
    case 200:
      return "OK";
    case 204:
      return "No Content";
    case 400:
      return "Bad Request";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 408:
      return "Request Timeout";
    case 413:
      return "Content Too Large";
    case 431:
      return "Request Header Fields Too Large";
    case 501:
      return "Not Implemented";
    case 503:
      return "Service Unavailable";
    case 505:
      return "HTTP Version Not Supported";
    default:
      return "Error";
  }
}

// Plain appends rather than snprintf: this runs for every answer.
inline void append_response(std::string& out, int code, std::string_view type, std::string_view body,
                            bool close) {
  char num[24];
  out += "HTTP/1.1 ";
  out.append(num, static_cast<std::size_t>(std::to_chars(num, num + sizeof num, code).ptr - num));
  out.push_back(' ');
  out += status_text(code);
  out += "\r\nContent-Type: ";
  out += type;
  out += "\r\nContent-Length: ";
  out.append(num, static_cast<std::size_t>(std::to_chars(num, num + sizeof num, body.size()).ptr - num));
  out += close ? "\r\nConnection: close\r\n\r\n" : "\r\n\r\n";
  out.append(body);
}

}  // namespace adpop
