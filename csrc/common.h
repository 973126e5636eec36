// Helpers shared by every op's CPU (C++) and CUDA sources. Math headers include only this file, so
// they compile unchanged in both builds and the CPU tests exercise the CUDA arithmetic.
#pragma once

#if defined(__CUDACC__)
#define CF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CF_HOST_DEVICE inline
#endif

// Input checks with plain messages (flash-attention style); need TORCH_CHECK from the includer.
#define CF_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor")
#define CF_CHECK_CUDA(x) TORCH_CHECK((x).device().is_cuda(), #x " must be a CUDA tensor")
#define CF_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")

// x86-64 builds target baseline x86-64 (the wheel must load on any CPU), where fma() and floor() are
// library calls and vectors are 128-bit. Hot CPU loops are compiled a second time for AVX2 + FMA and
// chosen at run time: `run_best_cpu(f)` calls f through a wrapper whose `flatten` inlines everything f
// calls, so that code is compiled for the wrapper's target. Explicit fma() gives the same bits either
// way; write loops whose results must not depend on the CPU without a * b + c (GCC contracts it to an
// FMA where the target has one).
#if !defined(__CUDACC__) && defined(__GNUC__) && defined(__x86_64__)
#define CF_X86_AVX2_CLONES 1
#include <cstdlib>
#include <cstring>

// CROPFORMER_CPU_ISA=baseline keeps the baseline code (tests compare the two; read once per process).
inline bool cpu_has_avx2_fma() {
  static const bool has = [] {
    const char* isa = std::getenv("CROPFORMER_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "baseline") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
template <typename F>
__attribute__((target("avx2,fma"), flatten)) void run_avx2_fma(const F& f) {
  f();
}
#endif

#if !defined(__CUDACC__)
template <typename F>
inline void run_best_cpu(const F& f) {
#ifdef CF_X86_AVX2_CLONES
  if (cpu_has_avx2_fma()) {
    run_avx2_fma(f);
    return;
  }
#endif
  f();
}
#endif
