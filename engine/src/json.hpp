// A small JSON reader for request bodies: a flat DOM of string_views into the request
// buffer (escapes decoded in place), with limits on depth and element count. No exceptions.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

namespace adpop::json {

// Whether `s` is well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing past
// U+10FFFF): what the reader requires of strings, the query parser of values, and the
// origin's decoder of spool strings.
bool valid_utf8(std::string_view s);

enum class Type : std::uint8_t { kNull, kBool, kNumber, kString, kArray, kObject };

struct Value {
  Type type = Type::kNull;
  bool boolean = false;
  double number = 0;
  std::string_view text;    // string contents (decoded) or a number's text
  std::uint32_t first = 0;  // arrays/objects: index of the first child in Document::values
  std::uint32_t count = 0;  // arrays/objects: number of children
  std::uint32_t next = 0;   // index of the next sibling, 0 for none
  std::string_view key;     // for object members: the member name
};

struct Limits {
  std::uint32_t max_depth = 16;
  std::uint32_t max_values = 4096;
};

class Document {
 public:
  // Parses `buffer` in place (string escapes are decoded into it). Returns false with a
  // short reason on any syntax error or exceeded limit.
  bool parse(char* buffer, std::size_t size, const Limits& limits, const char** error);

  const Value& root() const { return values_[0]; }
  const Value& at(std::uint32_t i) const { return values_[i]; }
  // Member of an object by name, or nullptr.
  const Value* member(const Value& object, std::string_view name) const;

  template <typename F>
  void each(const Value& container, F&& fn) const {
    if (container.count == 0) return;
    std::uint32_t i = container.first;
    while (true) {
      fn(values_[i]);
      if (values_[i].next == 0) break;
      i = values_[i].next;
    }
  }

 private:
  bool parse_value(std::uint32_t depth, std::uint32_t slot);
  bool parse_string(std::string_view* out);
  void skip_ws();

  std::vector<Value> values_;
  char* p_ = nullptr;
  char* end_ = nullptr;
  Limits limits_;
  const char* error_ = nullptr;
};

}  // namespace adpop::json
