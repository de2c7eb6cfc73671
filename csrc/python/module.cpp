// The Python module adaround_ext._C. Importing it runs the TORCH_LIBRARY registrations of the
// ops; the module itself only reports how it was built.
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

#include <memory>
#include <string>

#include "../device/emulation.h"
#include "../iteration_graph.h"
#include "../progress.h"

namespace {

// The exception a signal handler raised while optimize_layer ran (KeyboardInterrupt for Ctrl-C), kept
// until adaround_ext.layer raises it again once the op has returned; nullptr when none.
PyObject* g_interrupt = nullptr;

// The loop's interrupt poll (progress.h): runs Python's pending signal handlers, which the loop would
// otherwise hold off until it ends.
bool python_signal_pending() {
  pybind11::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() == 0) return false;
  PyObject *type = nullptr, *value = nullptr, *traceback = nullptr;
  PyErr_Fetch(&type, &value, &traceback);
  PyErr_NormalizeException(&type, &value, &traceback);
  Py_XDECREF(type);
  Py_XDECREF(traceback);
  Py_XDECREF(g_interrupt);
  g_interrupt = value;
  return true;
}

}  // namespace

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
  adaround::progress::set_interrupt_check(&python_signal_pending);
  m.def(
      "take_interrupt",
      [] {
        PyObject* raised = g_interrupt;
        g_interrupt = nullptr;
        return raised != nullptr ? pybind11::reinterpret_steal<pybind11::object>(raised) : pybind11::none();
      },
      "the exception a signal handler raised during the last optimize_layer (then forgotten), or None");
  m.def("set_cuda_emulation", &adaround::emulation::set_enabled,
        "routes the CPU ops to the host emulation of their CUDA kernels (csrc/device/emulation.h)");
  m.def("cuda_emulation", &adaround::emulation::enabled, "whether the CUDA kernels are being emulated on the CPU");

  // optimize_layer's iteration graph, for tests of capture and its fallback. While one exists the
  // thread's current CUDA stream is the side stream its iterations run on.
  pybind11::class_<adaround::IterationGraph, std::unique_ptr<adaround::IterationGraph>>(m, "_IterationGraph")
      .def(
          "capture",
          [](adaround::IterationGraph& graph, const pybind11::function& iteration) {
            torch::PyWarningHandler warnings;  // TORCH_WARN reaches Python's warnings
            return graph.capture([iteration] { iteration(); });  // a replay may call it again
          },
          "records iteration() without running it; False (after a warning) where that failed")
      .def("replay", &adaround::IterationGraph::replay);
  m.def(
      "_make_iteration_graph",
      [](const std::string& device) { return adaround::make_iteration_graph(c10::Device(device)); },
      "an iteration graph for the device, or None where none is recorded there");
}
