// The Python module adaround_ext._C. Importing it runs the TORCH_LIBRARY registrations of the
// ops; the module itself only reports how it was built.
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

#include <memory>
#include <string>

#include "../cpu/depthwise_grad.h"
#include "../device/emulation.h"
#include "../grid.h"
#include "../iteration_graph.h"
#include "../loop/active_weights.h"
#include "../loop/execution_path.h"
#include "../loop/run_checks.h"
#include "../optimize_options.h"
#include "../progress.h"
#include "../rounding_math.h"
#include "../schedule.h"

namespace {

// The exception a signal handler raised while optimize_layer ran (KeyboardInterrupt for Ctrl-C), kept
// until adaround_ext._ops.optimize_layer raises it again once the op has returned; nullptr when none.
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

// The given optimize_layer options (by name, the others at their defaults), checked as the op would
// check them; a bad value or an unknown name raises ValueError naming the option.
adaround::OptimizeOptions read_optimize_options(const pybind11::kwargs& given) {
  adaround::OptimizeOptions options;
  size_t known = 0;
#define ADAROUND_READ(type, name)                                                                  \
  if (given.contains(#name)) {                                                                     \
    try {                                                                                          \
      options.name = given[#name].cast<type>();                                                    \
    } catch (const pybind11::cast_error&) {                                                        \
      throw pybind11::value_error("optimize_layer option " #name " must be " #type ", got " +      \
                                  pybind11::repr(given[#name]).cast<std::string>());               \
    }                                                                                              \
    ++known;                                                                                       \
  }
  ADAROUND_OPTIMIZE_OPTIONS(ADAROUND_READ)
#undef ADAROUND_READ
  if (known != given.size()) {
    std::string unknown;
    for (const auto& item : given) {
      const auto name = item.first.cast<std::string>();
#define ADAROUND_IS(type, option) name == #option ||
      if (!(ADAROUND_OPTIMIZE_OPTIONS(ADAROUND_IS) false)) unknown += (unknown.empty() ? "" : ", ") + name;
#undef ADAROUND_IS
    }
    throw pybind11::value_error("optimize_layer has no option " + unknown);
  }
  try {
    adaround::loop::check_options(options);
  } catch (const c10::Error& e) {
    throw pybind11::value_error(e.what_without_backtrace());
  }
  return options;
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
  m.def(
      "code_dtype",
      [](int64_t quant_min, int64_t quant_max) {
        const at::ScalarType dtype = adaround::code_dtype(quant_min, quant_max);
        return pybind11::reinterpret_borrow<pybind11::object>(reinterpret_cast<PyObject*>(torch::getTHPDtype(dtype)));
      },
      "the dtype of the integer codes of a [quant_min, quant_max] grid (the kernels' rule, for the fakes)");
  m.def(
      "check_optimize_options", [](const pybind11::kwargs& given) { read_optimize_options(given); },
      "raises ValueError for an optimize_layer option (keyword arguments) the op would refuse");
  m.def(
      "schedule_table", [](const pybind11::kwargs& given) { return adaround::schedule_table(read_optimize_options(given)); },
      "optimize_layer's per-iteration scalars for these options (schedule.h): float64 [iterations, 4]");
  m.attr("adam_constants") = pybind11::make_tuple(adaround::kAdamBeta1, adaround::kAdamBeta2, adaround::kAdamEps);
  m.attr("gemm_max_positions") = adaround::loop::kGemmMaxPositions;  // the unfolded GEMM path's bound
  m.attr("saturated_v") = adaround::kSaturatedV;  // |V| at which h(V) is exactly 0 or 1 (rounding_math.h)
  m.def("depthwise_weight_grad", &adaround::cpu::depthwise_weight_grad, pybind11::arg("grad_out"), pybind11::arg("x"),
        pybind11::arg("kernel_size"), pybind11::arg("stride"), pybind11::arg("padding"), pybind11::arg("dilation"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "dL/dW of a depthwise Conv2d on the CPU, computed directly (csrc/cpu/depthwise_grad.h)");
  m.def("direct_depthwise_grad_applies", &adaround::cpu::direct_depthwise_grad_applies, pybind11::arg("grad_out"),
        pybind11::arg("x"), pybind11::arg("groups"), "whether depthwise_weight_grad is the faster weight gradient here");
  m.def("winograd_tile", &adaround::loop::winograd_tile, pybind11::arg("in_channels"), pybind11::arg("out_height"),
        pybind11::arg("out_width"),
        "Winograd tile side (2 or 4) of a CPU 3x3 stride-1 convolution with these outputs, 0: none (choose_path's rule)");
  m.def("set_cuda_emulation", &adaround::emulation::set_enabled,
        "routes the CPU ops to the host emulation of their CUDA kernels (csrc/device/emulation.h)");
  m.def("cuda_emulation", &adaround::emulation::enabled, "whether the CUDA kernels are being emulated on the CPU");

  // The per-layer loop's rounding state, for block reconstruction (python/adaround_ext/blocks.py):
  // each layer of a block keeps V, the Adam moments and W~ as optimize_layer does, frozen weights
  // packed out of the step on the CPU included.
  using adaround::ActiveWeights;
  pybind11::class_<ActiveWeights>(m, "RoundingState")
      .def(pybind11::init([](const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero_point,
                             int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis, bool pack) {
             // Packing runs where optimize_layer's CPU paths run (not under the CUDA emulation).
             return ActiveWeights(weight, scale, zero_point, quant_min, quant_max, axis,
                                  pack && adaround::loop::cpu_paths_allowed(weight));
           }),
           pybind11::arg("weight"), pybind11::arg("scale"), pybind11::arg("zero_point"), pybind11::arg("quant_min"),
           pybind11::arg("quant_max"), pybind11::arg("axis"), pybind11::arg("pack"),
           "V initialised so that h(V) is the fractional part of weight/scale, zero moments, W~ of that V; "
           "`weight` in the kernels' compute dtype, its channels (axis 0 or none) outermost to pack")
      .def_property_readonly("soft_weight", &ActiveWeights::soft_weight, "W~ (updated in place by each step)")
      .def_property_readonly("v", &ActiveWeights::v,
                             "V of every weight (frozen ones as they were packed out); the state's own tensor "
                             "until the first pack, a copy after")
      .def_property_readonly("active_fraction", &ActiveWeights::active_fraction, "share of the weights stepped")
      .def_property_readonly("can_pack", &ActiveWeights::can_pack, "whether repack may pack weights out")
      .def("step", &ActiveWeights::step, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "one Adam step (step counts from 1) from dL/dW~")
      .def("step_scheduled", &ActiveWeights::step_scheduled, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "the step with reg_lambda, beta and the bias corrections read from a schedule_table row on the "
           "weights' device (never packed)")
      .def("regularizer", &ActiveWeights::regularizer, "the regulariser's sum over all weights (0-dim tensor)")
      .def("repack", &ActiveWeights::repack, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "packs the frozen weights out of the step (host sync)")
      .def_property_readonly_static(
          "repack_every", [](const pybind11::object&) { return ActiveWeights::kRepackEvery; },
          "iterations between repacks, in optimize_layer's loop and the block loop");

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
