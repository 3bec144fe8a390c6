// Which instruction set the CPU kernels run with. Files with hot loops (merge.cpp, ot.cpp) are
// compiled twice on x86-64: for the baseline ISA (namespace cpu::base) and with -mavx2
// (namespace cpu::avx2); their entry points pick one at run time.
#pragma once
#include <string>

namespace transferops::cpu {

// "avx2" where the CPU has it (and the build compiled it), else "base". set_cpu_isa forces one
// (tests compare the two bit for bit).
const char* cpu_isa();
void set_cpu_isa(const std::string& isa);

}  // namespace transferops::cpu
