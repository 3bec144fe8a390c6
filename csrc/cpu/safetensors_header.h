// The JSON header of a safetensors file, parsed strictly in one linear pass.
// Grammar accepted (anything else is an error): UTF-8 text, a top-level object whose first
// byte is '{', then only whitespace. Each key is a tensor name, except "__metadata__", whose
// value is null or an object of strings. A tensor's value is an object with exactly the keys
// "dtype" (a string), "shape" (an array of integers) and "data_offsets" (an array of two
// integers); integers are plain decimal tokens below 2^63 (no sign, fraction or exponent).
// No key appears twice in an object. Strings follow JSON's escapes; a lone surrogate is an
// error. Semantic checks (known dtypes, sizes, tiling) are left to the caller, who gets
// arrays.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace transferops::cpu {

struct SafetensorsHeader {
  std::vector<std::string> names;
  std::vector<int32_t> dtypes;   // index into the caller's list of dtype codes, -1 if unknown
  std::vector<int64_t> ranks;    // per tensor: the length of its shape
  std::vector<int64_t> dims;     // per tensor: a 1, then its shape
  std::vector<int64_t> offsets;  // per tensor: begin, end
  bool has_metadata = false;
  std::vector<std::pair<std::string, std::string>> metadata;
};

// Throws std::invalid_argument with a message naming the tensor or position at fault.
SafetensorsHeader parse_safetensors_header(const char* data, size_t size, const std::vector<std::string>& codes);

}  // namespace transferops::cpu
