// A recursive-descent parser for exactly the grammar in safetensors_header.h: no general JSON
// values, so nesting is bounded (object, object, array) and no input can exhaust the stack.
#include "safetensors_header.h"

#include <stdexcept>
#include <string_view>
#include <unordered_map>
#include <unordered_set>

namespace transferops::cpu {
namespace {

class Parser {
 public:
  Parser(const char* data, size_t size) : p_(reinterpret_cast<const unsigned char*>(data)), end_(p_ + size),
                                          begin_(p_) {}

  [[noreturn]] void fail(const std::string& why) const {
    throw std::invalid_argument(why + " (at byte " + std::to_string(p_ - begin_) + " of the header)");
  }

  void ws() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }
  bool at_end() const { return p_ == end_; }
  bool peek(char c) {
    ws();
    return p_ < end_ && *p_ == static_cast<unsigned char>(c);
  }
  void expect(char c, const char* what) {
    ws();
    if (p_ == end_ || *p_ != static_cast<unsigned char>(c)) fail(std::string("expected ") + what);
    ++p_;
  }
  bool accept(char c) {
    if (!peek(c)) return false;
    ++p_;
    return true;
  }

  std::string string() {
    expect('"', "a string");
    std::string out;
    for (;;) {
      if (p_ == end_) fail("unterminated string");
      unsigned char c = *p_;
      if (c == '"') {
        ++p_;
        return out;
      }
      if (c < 0x20) fail("control character in a string");
      if (c == '\\') {
        ++p_;
        if (p_ == end_) fail("unterminated string");
        switch (*p_++) {
          case '"': out += '"'; break;
          case '\\': out += '\\'; break;
          case '/': out += '/'; break;
          case 'b': out += '\b'; break;
          case 'f': out += '\f'; break;
          case 'n': out += '\n'; break;
          case 'r': out += '\r'; break;
          case 't': out += '\t'; break;
          case 'u': append_utf8(out, escaped_code_point()); break;
          default: fail("invalid escape in a string");
        }
      } else if (c < 0x80) {
        out += static_cast<char>(c);
        ++p_;
      } else {
        const unsigned char* start = p_;
        utf8_sequence();
        out.append(reinterpret_cast<const char*>(start), p_ - start);
      }
    }
  }

  // A plain decimal integer below 2^63.
  int64_t integer() {
    ws();
    const unsigned char* start = p_;
    if (p_ < end_ && *p_ == '-') fail("expected a non-negative integer, got a negative number");
    uint64_t v = 0;
    while (p_ < end_ && *p_ >= '0' && *p_ <= '9') {
      if (v > (uint64_t(INT64_MAX) - (*p_ - '0')) / 10) fail("integer too large");
      v = v * 10 + (*p_++ - '0');
    }
    if (p_ == start) fail("expected a non-negative integer");
    if (*start == '0' && p_ - start > 1) fail("integer with a leading zero");
    if (p_ < end_ && (*p_ == '.' || *p_ == 'e' || *p_ == 'E')) fail("expected an integer, got a fraction or exponent");
    return static_cast<int64_t>(v);
  }

  bool null() {
    ws();
    if (end_ - p_ >= 4 && std::string_view(reinterpret_cast<const char*>(p_), 4) == "null") {
      p_ += 4;
      return true;
    }
    return false;
  }

 private:
  uint32_t hex4() {
    if (end_ - p_ < 4) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      unsigned char c = *p_++;
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("invalid \\u escape");
    }
    return v;
  }

  uint32_t escaped_code_point() {
    uint32_t u = hex4();
    if (u >= 0xDC00 && u <= 0xDFFF) fail("lone surrogate in a \\u escape");
    if (u >= 0xD800 && u <= 0xDBFF) {
      if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u') fail("lone surrogate in a \\u escape");
      p_ += 2;
      uint32_t low = hex4();
      if (low < 0xDC00 || low > 0xDFFF) fail("lone surrogate in a \\u escape");
      u = 0x10000 + ((u - 0xD800) << 10) + (low - 0xDC00);
    }
    return u;
  }

  static void append_utf8(std::string& out, uint32_t u) {
    if (u < 0x80) {
      out += static_cast<char>(u);
    } else if (u < 0x800) {
      out += static_cast<char>(0xC0 | (u >> 6));
      out += static_cast<char>(0x80 | (u & 0x3F));
    } else if (u < 0x10000) {
      out += static_cast<char>(0xE0 | (u >> 12));
      out += static_cast<char>(0x80 | ((u >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (u & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (u >> 18));
      out += static_cast<char>(0x80 | ((u >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((u >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (u & 0x3F));
    }
  }

  // One well-formed UTF-8 sequence of 2-4 bytes: no overlong forms, surrogates or code
  // points past U+10FFFF (Python's strict decoder's rules).
  void utf8_sequence() {
    unsigned char c = *p_;
    int n;
    uint32_t u, min;
    if (c >= 0xC2 && c <= 0xDF) n = 1, u = c & 0x1F, min = 0x80;
    else if (c >= 0xE0 && c <= 0xEF) n = 2, u = c & 0x0F, min = 0x800;
    else if (c >= 0xF0 && c <= 0xF4) n = 3, u = c & 0x07, min = 0x10000;
    else fail("invalid UTF-8");
    if (end_ - p_ <= n) fail("invalid UTF-8");
    for (int i = 1; i <= n; ++i) {
      if ((p_[i] & 0xC0) != 0x80) fail("invalid UTF-8");
      u = (u << 6) | (p_[i] & 0x3F);
    }
    if (u < min || u > 0x10FFFF || (u >= 0xD800 && u <= 0xDFFF)) fail("invalid UTF-8");
    p_ += n + 1;
  }

  const unsigned char* p_;
  const unsigned char* end_;
  const unsigned char* begin_;
};

void tensor(Parser& ps, SafetensorsHeader& h, const std::string& name,
            const std::unordered_map<std::string_view, int32_t>& codes) {
  auto bad = [&](const std::string& why) { throw std::invalid_argument("tensor '" + name + "': " + why); };
  ps.expect('{', "an object with dtype, shape and data_offsets");
  bool seen[3] = {false, false, false};
  if (!ps.accept('}')) {
    do {
      std::string key = ps.string();
      ps.expect(':', "':'");
      int k = key == "dtype" ? 0 : key == "shape" ? 1 : key == "data_offsets" ? 2 : -1;
      if (k < 0) bad("unexpected key '" + key + "' (expected dtype, shape and data_offsets)");
      if (seen[k]) bad("key '" + key + "' given twice");
      seen[k] = true;
      if (k == 0) {
        std::string code = ps.string();
        auto it = codes.find(code);
        h.dtypes.push_back(it == codes.end() ? -1 : it->second);
        if (it == codes.end()) bad("unsupported dtype '" + code + "'");
      } else if (k == 1) {
        ps.expect('[', "shape: an array of integers");
        h.dims.push_back(1);
        size_t first = h.dims.size();
        if (!ps.accept(']')) {
          do h.dims.push_back(ps.integer());
          while (ps.accept(','));
          ps.expect(']', "']' closing shape");
        }
        h.ranks.push_back(static_cast<int64_t>(h.dims.size() - first));
      } else {
        ps.expect('[', "data_offsets: [begin, end]");
        h.offsets.push_back(ps.integer());
        ps.expect(',', "data_offsets: [begin, end]");
        h.offsets.push_back(ps.integer());
        ps.expect(']', "data_offsets: [begin, end]");
      }
    } while (ps.accept(','));
    ps.expect('}', "'}' closing the tensor's object");
  }
  if (!(seen[0] && seen[1] && seen[2])) bad("expected dtype, shape and data_offsets");
}

}  // namespace

SafetensorsHeader parse_safetensors_header(const char* data, size_t size, const std::vector<std::string>& codes) {
  std::unordered_map<std::string_view, int32_t> code_index;
  for (size_t i = 0; i < codes.size(); ++i) code_index.emplace(codes[i], static_cast<int32_t>(i));
  SafetensorsHeader h;
  Parser ps(data, size);
  if (size == 0 || data[0] != '{') throw std::invalid_argument("the header is not a JSON object");
  ps.expect('{', "'{'");
  if (!ps.accept('}')) {
    do {
      std::string key = ps.string();
      ps.expect(':', "':'");
      if (key == "__metadata__") {
        if (h.has_metadata) throw std::invalid_argument("__metadata__ given twice");
        h.has_metadata = true;
        if (ps.null()) continue;
        ps.expect('{', "__metadata__: an object of strings");
        std::unordered_set<std::string> keys;
        if (!ps.accept('}')) {
          do {
            std::string k = ps.string();
            ps.expect(':', "':'");
            if (!ps.peek('"')) throw std::invalid_argument("__metadata__ is not an object of strings");
            if (!keys.insert(k).second) throw std::invalid_argument("__metadata__ names '" + k + "' twice");
            h.metadata.emplace_back(std::move(k), ps.string());
          } while (ps.accept(','));
          ps.expect('}', "'}' closing __metadata__");
        }
      } else {
        tensor(ps, h, key, code_index);
        h.names.push_back(std::move(key));
      }
    } while (ps.accept(','));
    ps.expect('}', "'}' closing the header");
  }
  ps.ws();
  if (!ps.at_end()) ps.fail("extra data after the header's object");
  std::unordered_set<std::string_view> seen;
  seen.reserve(h.names.size());
  for (const auto& n : h.names) {
    if (!seen.insert(n).second) throw std::invalid_argument("names '" + n + "' twice");
  }
  return h;
}

}  // namespace transferops::cpu
