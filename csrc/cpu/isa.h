// Which instruction set the CPU kernels run with. Files with hot loops are compiled more than
// once on x86-64: adapters.cpp, merging.cpp and ot.cpp for the baseline ISA (namespace cpu::base)
// and with -mavx2 (cpu::avx2); merging.cpp and topk_passes.cpp also with AVX-512 (cpu::avx512),
// whose masked adds and compares their passes use, while the adapter and Sinkhorn register blocks
// are sized for 32-byte vectors. Entry points pick a build at run time.
#pragma once
#include <string>
#include <vector>

// The namespace this translation unit's kernels go in: `base`, or the ISA the build passes
// (TRANSFEROPS_ISA=avx2 or avx512 for the other compilations); TRANSFEROPS_ISA_BASE marks the
// baseline one, which also holds the run-time dispatch.
#ifndef TRANSFEROPS_ISA
#define TRANSFEROPS_ISA base
#define TRANSFEROPS_ISA_BASE 1
#endif

#ifdef TRANSFEROPS_HAVE_AVX2
#define TRANSFEROPS_IF_AVX2(...) __VA_ARGS__
#else
#define TRANSFEROPS_IF_AVX2(...)
#endif
#ifdef TRANSFEROPS_HAVE_AVX512
#define TRANSFEROPS_IF_AVX512(...) __VA_ARGS__
#else
#define TRANSFEROPS_IF_AVX512(...)
#endif

// An entry point's body (inside namespace transferops::cpu): `return isa::call` for the highest
// build of its file at or below the chosen level, for files built for base and AVX2, or also for
// AVX-512.
#define TRANSFEROPS_RUN_UP_TO_AVX2(call)                                   \
  do {                                                                     \
    TRANSFEROPS_IF_AVX2(if (isa_level() >= Isa::avx2) return avx2::call;)  \
    return base::call;                                                     \
  } while (0)
#define TRANSFEROPS_RUN_UP_TO_AVX512(call)                                     \
  do {                                                                         \
    TRANSFEROPS_IF_AVX512(if (isa_level() >= Isa::avx512) return avx512::call;) \
    TRANSFEROPS_RUN_UP_TO_AVX2(call);                                          \
  } while (0)

namespace transferops::cpu {

enum class Isa : int { base = 0, avx2 = 1, avx512 = 2 };

// The chosen level: the highest this build compiled and this CPU runs, unless set_cpu_isa forced
// a lower one (tests compare the builds).
Isa isa_level();
const char* cpu_isa();
void set_cpu_isa(const std::string& isa);
// The levels this build compiled and this CPU runs, lowest first.
std::vector<std::string> cpu_isas();

}  // namespace transferops::cpu
