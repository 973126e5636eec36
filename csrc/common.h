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
