#include "json.hpp"

#include <cstdlib>
#include <cstring>

namespace adpop::json {

namespace {

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// The length of the well-formed UTF-8 sequence at `p` (whose first byte is >= 0x80), or 0.
int utf8_length(const char* p, const char* end) {
  const auto byte = [&](std::ptrdiff_t i) { return static_cast<unsigned char>(p[i]); };
  const unsigned char b0 = byte(0);
  int length = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // the range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    length = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    length = 3;
    if (b0 == 0xE0) lo = 0xA0;  // overlong
    if (b0 == 0xED) hi = 0x9F;  // UTF-16 surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    length = 4;
    if (b0 == 0xF0) lo = 0x90;  // overlong
    if (b0 == 0xF4) hi = 0x8F;  // past U+10FFFF
  } else {
    return 0;  // a continuation byte first, an overlong lead (C0, C1) or F5..FF
  }
  if (end - p < length || byte(1) < lo || byte(1) > hi) return 0;
  for (int i = 2; i < length; ++i)
    if (byte(i) < 0x80 || byte(i) > 0xBF) return 0;
  return length;
}

// Writes `cp` as UTF-8 at `out`; returns bytes written.
int put_utf8(char* out, std::uint32_t cp) {
  if (cp < 0x80) {
    out[0] = static_cast<char>(cp);
    return 1;
  }
  if (cp < 0x800) {
    out[0] = static_cast<char>(0xC0 | (cp >> 6));
    out[1] = static_cast<char>(0x80 | (cp & 0x3F));
    return 2;
  }
  if (cp < 0x10000) {
    out[0] = static_cast<char>(0xE0 | (cp >> 12));
    out[1] = static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out[2] = static_cast<char>(0x80 | (cp & 0x3F));
    return 3;
  }
  out[0] = static_cast<char>(0xF0 | (cp >> 18));
  out[1] = static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
  out[2] = static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
  out[3] = static_cast<char>(0x80 | (cp & 0x3F));
  return 4;
}

}  // namespace

bool valid_utf8(std::string_view s) {
  const char* p = s.data();
  const char* end = p + s.size();
  while (p < end) {
    if (static_cast<unsigned char>(*p) < 0x80) {
      ++p;
      continue;
    }
    const int length = utf8_length(p, end);
    if (length == 0) return false;
    p += length;
  }
  return true;
}

void Document::skip_ws() {
  while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
}

bool Document::parse(char* buffer, std::size_t size, const Limits& limits, const char** error) {
  values_.clear();
  p_ = buffer;
  end_ = buffer + size;
  limits_ = limits;
  error_ = nullptr;
  values_.emplace_back();
  bool ok = parse_value(0, 0);
  if (ok) {
    skip_ws();
    if (p_ != end_) {
      error_ = "trailing characters after the JSON value";
      ok = false;
    }
  }
  if (!ok && error) *error = error_ ? error_ : "invalid JSON";
  return ok;
}

bool Document::parse_string(std::string_view* out) {
  // p_ is at the opening quote. Decoding never lengthens the text, so it is done in place.
  ++p_;
  char* start = p_;
  char* w = p_;
  while (true) {
    if (p_ >= end_) {
      error_ = "unterminated string";
      return false;
    }
    char c = *p_++;
    if (c == '"') break;
    if (static_cast<unsigned char>(c) < 0x20) {
      error_ = "control character in string";
      return false;
    }
    if (static_cast<unsigned char>(c) >= 0x80) {
      // Raw UTF-8: copied only when it is well formed (RFC 3629: no overlong forms, no
      // surrogates, nothing past U+10FFFF), so no answer or record ever carries bad bytes.
      const int length = utf8_length(p_ - 1, end_);
      if (length == 0) {
        error_ = "invalid UTF-8 in string";
        return false;
      }
      *w++ = c;
      for (int i = 1; i < length; ++i) *w++ = *p_++;
      continue;
    }
    if (c != '\\') {
      *w++ = c;
      continue;
    }
    if (p_ >= end_) {
      error_ = "unterminated escape";
      return false;
    }
    char e = *p_++;
    switch (e) {
      case '"':
        *w++ = '"';
        break;
      case '\\':
        *w++ = '\\';
        break;
      case '/':
        *w++ = '/';
        break;
      case 'b':
        *w++ = '\b';
        break;
      case 'f':
        *w++ = '\f';
        break;
      case 'n':
        *w++ = '\n';
        break;
      case 'r':
        *w++ = '\r';
        break;
      case 't':
        *w++ = '\t';
        break;
      case 'u': {
        auto read4 = [&](std::uint32_t* cp) {
          if (end_ - p_ < 4) return false;
          std::uint32_t v = 0;
          for (int i = 0; i < 4; ++i) {
            int d = hex_digit(p_[i]);
            if (d < 0) return false;
            v = v << 4 | static_cast<std::uint32_t>(d);
          }
          p_ += 4;
          *cp = v;
          return true;
        };
        std::uint32_t cp = 0;
        if (!read4(&cp)) {
          error_ = "bad \\u escape";
          return false;
        }
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          std::uint32_t low = 0;
          if (end_ - p_ < 6 || p_[0] != '\\' || p_[1] != 'u' || (p_ += 2, !read4(&low)) || low < 0xDC00 ||
              low > 0xDFFF) {
            error_ = "unpaired surrogate";
            return false;
          }
          cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
        } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
          error_ = "unpaired surrogate";
          return false;
        }
        // A \uXXXX escape is 6 bytes and its UTF-8 at most 4 (a pair: 12 and 4): in place.
        w += put_utf8(w, cp);
        break;
      }
      default:
        error_ = "bad escape";
        return false;
    }
  }
  *out = std::string_view(start, static_cast<std::size_t>(w - start));
  return true;
}

bool Document::parse_value(std::uint32_t depth, std::uint32_t slot) {
  if (depth > limits_.max_depth) {
    error_ = "JSON nested too deeply";
    return false;
  }
  skip_ws();
  if (p_ >= end_) {
    error_ = "unexpected end of JSON";
    return false;
  }
  char c = *p_;
  if (c == '"') {
    std::string_view s;
    if (!parse_string(&s)) return false;
    values_[slot].type = Type::kString;
    values_[slot].text = s;
    return true;
  }
  if (c == '{' || c == '[') {
    const bool object = c == '{';
    const char close = object ? '}' : ']';
    ++p_;
    values_[slot].type = object ? Type::kObject : Type::kArray;
    skip_ws();
    if (p_ < end_ && *p_ == close) {
      ++p_;
      return true;
    }
    std::uint32_t prev = 0;
    while (true) {
      std::string_view key;
      if (object) {
        skip_ws();
        if (p_ >= end_ || *p_ != '"') {
          error_ = "expected a member name";
          return false;
        }
        if (!parse_string(&key)) return false;
        skip_ws();
        if (p_ >= end_ || *p_ != ':') {
          error_ = "expected ':'";
          return false;
        }
        ++p_;
      }
      if (values_.size() >= limits_.max_values) {
        error_ = "too many JSON values";
        return false;
      }
      const auto child = static_cast<std::uint32_t>(values_.size());
      values_.emplace_back();
      values_[child].key = key;
      if (values_[slot].count == 0)
        values_[slot].first = child;
      else
        values_[prev].next = child;
      values_[slot].count++;
      prev = child;
      if (!parse_value(depth + 1, child)) return false;
      skip_ws();
      if (p_ >= end_) {
        error_ = "unexpected end of JSON";
        return false;
      }
      if (*p_ == ',') {
        ++p_;
        continue;
      }
      if (*p_ == close) {
        ++p_;
        return true;
      }
      error_ = object ? "expected ',' or '}'" : "expected ',' or ']'";
      return false;
    }
  }
  if (c == 't' && end_ - p_ >= 4 && std::memcmp(p_, "true", 4) == 0) {
    p_ += 4;
    values_[slot].type = Type::kBool;
    values_[slot].boolean = true;
    return true;
  }
  if (c == 'f' && end_ - p_ >= 5 && std::memcmp(p_, "false", 5) == 0) {
    p_ += 5;
    values_[slot].type = Type::kBool;
    return true;
  }
  if (c == 'n' && end_ - p_ >= 4 && std::memcmp(p_, "null", 4) == 0) {
    p_ += 4;
    return true;
  }
  if (c == '-' || (c >= '0' && c <= '9')) {
    char* start = p_;
    if (*p_ == '-') ++p_;
    // RFC 8259: no leading zeros ("0" itself, "0.5" and "-0" are fine).
    if (end_ - p_ >= 2 && p_[0] == '0' && p_[1] >= '0' && p_[1] <= '9') {
      error_ = "bad number: leading zero";
      return false;
    }
    auto digits = [&] {
      char* s = p_;
      while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
      return p_ > s;
    };
    if (!digits()) {
      error_ = "bad number";
      return false;
    }
    if (p_ < end_ && *p_ == '.') {
      ++p_;
      if (!digits()) {
        error_ = "bad number";
        return false;
      }
    }
    if (p_ < end_ && (*p_ == 'e' || *p_ == 'E')) {
      ++p_;
      if (p_ < end_ && (*p_ == '+' || *p_ == '-')) ++p_;
      if (!digits()) {
        error_ = "bad number";
        return false;
      }
    }
    values_[slot].type = Type::kNumber;
    values_[slot].text = std::string_view(start, static_cast<std::size_t>(p_ - start));
    // strtod needs a terminator; the text is copied to a small stack buffer first. A longer
    // number is refused, never cut short into another value.
    char tmp[64];
    const std::size_t n = values_[slot].text.size();
    if (n > sizeof tmp - 1) {
      error_ = "number too long (over 63 characters)";
      return false;
    }
    std::memcpy(tmp, start, n);
    tmp[n] = '\0';
    values_[slot].number = std::strtod(tmp, nullptr);
    return true;
  }
  error_ = "unexpected character in JSON";
  return false;
}

const Value* Document::member(const Value& object, std::string_view name) const {
  if (object.type != Type::kObject || object.count == 0) return nullptr;
  std::uint32_t i = object.first;
  while (true) {
    if (values_[i].key == name) return &values_[i];
    if (values_[i].next == 0) return nullptr;
    i = values_[i].next;
  }
}

}  // namespace adpop::json
