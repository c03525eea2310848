// The choice of the CPU kernels' ISA (see isa.h): the best built copy this CPU supports, or RLHF_KERNELS_CPU_ISA.
#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace rk {
namespace cpu {

namespace {

// What this CPU (and OS: __builtin_cpu_supports checks the saved register state) can run; each level
// needs every flag its copy is compiled with (setup.py: ISA_FLAGS).
bool cpu_runs(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  switch (isa) {
    case Isa::avx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case Isa::avx2: return avx2;
    default: return true;
  }
#else
  return isa == Isa::baseline;  // other architectures have the baseline copy only
#endif
}

constexpr Isa kAll[] = {Isa::baseline, Isa::avx2, Isa::avx512};

std::string built_list() {
  std::string out;
  for (Isa isa : kAll)
    if (built(isa)) out += std::string(out.empty() ? "" : ",") + isa_name(isa);
  return out;
}

Isa detect() {
  const char* env = std::getenv("RLHF_KERNELS_CPU_ISA");
  if (env == nullptr || *env == '\0') {
    for (Isa isa : {Isa::avx512, Isa::avx2})
      if (built(isa) && cpu_runs(isa)) return isa;
    return Isa::baseline;
  }
  const std::string want(env);
  for (Isa isa : kAll) {
    if (want != isa_name(isa)) continue;
    TORCH_CHECK(built(isa), "RLHF_KERNELS_CPU_ISA=", want, ": this build has no ", want,
                " kernels (it holds ", built_list(), ": RLHF_KERNELS_CPU_ISAS at build time); use one of those, or ",
                "unset it to pick the best");
    TORCH_CHECK(cpu_runs(isa), "RLHF_KERNELS_CPU_ISA=", want, ": this CPU cannot run the ", want,
                " kernels; use one of the ISAs it supports, or unset it to pick the best");
    return isa;
  }
  TORCH_CHECK(false, "RLHF_KERNELS_CPU_ISA must be one of baseline, avx2, avx512 (or unset), got '", want, "'");
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

Isa selected_isa() {
  static const Isa isa = detect();
  return isa;
}

}  // namespace cpu
}  // namespace rk
