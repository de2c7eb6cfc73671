// The Python module adaround_ext._C. Importing it runs the TORCH_LIBRARY registrations of the
// ops; the module itself only reports how it was built.
#include <torch/extension.h>

#include "../progress.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "adaround_ext native ops (registered as torch.ops.adaround.*)";
#ifdef ADAROUND_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
  m.def(
      "optimize_progress", [] { return adaround::progress::current(); },
      "(iterations done, total) of the optimize_layer call running now (or of the last one)");
  m.def(
      "reset_optimize_progress", [] { adaround::progress::report(0, 0); }, "sets the progress counter to (0, 0)");
}
