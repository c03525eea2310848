// Which vector ISA the CPU kernels run with. The loops of csrc/cpu/kernels/ are compiled once per ISA
// (setup.py: baseline, plus AVX2+FMA+F16C and AVX-512 F/BW/VL/DQ on x86-64, or the subset
// RLHF_KERNELS_CPU_ISAS names, which defines RK_CPU_WITH_<ISA> for each copy built besides the baseline),
// each copy in its own namespace rk::cpu::<isa>; selected_isa() picks the best built copy this CPU runs,
// once per process. RLHF_KERNELS_CPU_ISA=baseline|avx2|avx512 forces one (an error if this CPU lacks it or
// this build has no such copy).
#pragma once

namespace rk {
namespace cpu {

// Enumerator names are the namespace names of the per-ISA copies (Isa::RK_CPU_CAPABILITY names a copy's own).
enum class Isa { baseline = 0, avx2 = 1, avx512 = 2 };

const char* isa_name(Isa isa);

// Whether this build holds the kernels of `isa` (the baseline always).
constexpr bool built(Isa isa) {
  switch (isa) {
#if defined(RK_CPU_WITH_AVX512)
    case Isa::avx512: return true;
#endif
#if defined(RK_CPU_WITH_AVX2)
    case Isa::avx2: return true;
#endif
    case Isa::baseline: return true;
    default: return false;
  }
}

// The ISA of the kernels every op runs with (always a built one); the first call decides (and throws on a
// bad RLHF_KERNELS_CPU_ISA), later calls return the same.
Isa selected_isa();

// One op's kernel table from each compiled copy (null: a copy this build lacks), the selected one returned.
// Tables are constant-initialised (no code of an AVX-512 copy runs before the CPU is known to support it).
template <typename K> const K& pick(const K* baseline, const K* avx2, const K* avx512) {
  switch (selected_isa()) {  // never an ISA whose copy is absent, so never a null table
    case Isa::avx512: return *avx512;
    case Isa::avx2: return *avx2;
    default: return *baseline;
  }
}

}  // namespace cpu
}  // namespace rk
