// Python module stub for cropformer._C. Every op registers itself with TORCH_LIBRARY_FRAGMENT
// (namespace cropformer_C) in its own source file, so importing this module makes
// torch.ops.cropformer_C.* available; nothing here needs editing when an op is added.
#include <torch/extension.h>

#ifdef WITH_CUDA
namespace cropformer {
const char* cuda_arch_list();  // csrc/cuda_archs.cu
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
  m.attr("CUDA_ARCHS") = cropformer::cuda_arch_list();  // "800,900": sm_80 and sm_90
#else
  m.attr("WITH_CUDA") = false;
#endif
}
