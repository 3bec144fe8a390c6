#include "cpu/isa.h"

#include <stdexcept>

namespace transferops::cpu {
namespace {

const char* const kNames[] = {"base", "avx2", "avx512"};

// GCC's checks include the OS's support for the wider registers' state (XCR0).
bool runs(Isa level) {
  switch (level) {
    case Isa::base:
      return true;
    case Isa::avx2:
      TRANSFEROPS_IF_AVX2(return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");)
      return false;
    case Isa::avx512:
      TRANSFEROPS_IF_AVX512(return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");)
      return false;
  }
  return false;
}

Isa& chosen() {
  static Isa level = [] {
    Isa best = Isa::base;
    for (const Isa l : {Isa::avx2, Isa::avx512}) {
      if (runs(l)) best = l;
    }
    return best;
  }();
  return level;
}

}  // namespace

Isa isa_level() { return chosen(); }

const char* cpu_isa() { return kNames[int(chosen())]; }

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (const Isa l : {Isa::base, Isa::avx2, Isa::avx512}) {
    if (runs(l)) out.push_back(kNames[int(l)]);
  }
  return out;
}

void set_cpu_isa(const std::string& isa) {
  std::string known;
  for (const Isa l : {Isa::base, Isa::avx2, Isa::avx512}) {
    if (!runs(l)) continue;
    if (isa == kNames[int(l)]) {
      chosen() = l;
      return;
    }
    known += std::string(known.empty() ? "" : ", ") + kNames[int(l)];
  }
  throw std::invalid_argument("isa: expected one of the ISAs this build compiled and this CPU runs (" + known +
                              "), got '" + isa + "'");
}

}  // namespace transferops::cpu
