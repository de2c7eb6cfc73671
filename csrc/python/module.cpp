// The Python module adaround_ext._C. Importing it runs the TORCH_LIBRARY registrations of the
// ops; the module itself only reports how it was built.
#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "adaround_ext native ops (registered as torch.ops.adaround.*)";
#ifdef ADAROUND_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
}
