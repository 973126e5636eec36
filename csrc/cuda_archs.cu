// The GPU architectures this build's CUDA code was compiled for, exposed as cropformer._C.CUDA_ARCHS
// (module.cpp) so `auto` and `cropformer info` can tell a GPU the build lacks before launching on it.
// nvcc defines __CUDA_ARCH_LIST__ (CUDA >= 11.5) as the comma-separated virtual architectures, e.g.
// 750,800,900 for -gencode flags of sm_75, sm_80 and sm_90.
#define CF_STRINGIFY_ARGS(...) #__VA_ARGS__
#define CF_STRINGIFY(x) CF_STRINGIFY_ARGS(x)

namespace cropformer {

const char* cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return CF_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

}  // namespace cropformer
