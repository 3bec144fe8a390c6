// Which instruction set the CPU kernels run with. Files with hot loops (adapters.cpp, merge.cpp, ot.cpp) are
// compiled twice on x86-64: for the baseline ISA (namespace cpu::base) and with -mavx2
// (namespace cpu::avx2); their entry points pick one at run time.
#pragma once
#include <string>

// The namespace this translation unit's kernels go in: `base`, or the ISA the build passes
// (TRANSFEROPS_ISA=avx2 for the second compilation); TRANSFEROPS_ISA_BASE marks the baseline
// one, which also holds the run-time dispatch.
#ifndef TRANSFEROPS_ISA
#define TRANSFEROPS_ISA base
#define TRANSFEROPS_ISA_BASE 1
#endif

namespace transferops::cpu {

// "avx2" where the CPU has it (and the build compiled it), else "base". set_cpu_isa forces one
// (tests compare the two bit for bit).
const char* cpu_isa();
void set_cpu_isa(const std::string& isa);

}  // namespace transferops::cpu
