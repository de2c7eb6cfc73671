// Schemas of the activation fake-quantization ops: block reconstruction's per-tensor input
// quantizers, with an optional clamp fused in front (a ReLU or ReLU6), QDrop (each element keeps its
// float value with drop_probability, drawn from drop_seed and its position in memory: the backward
// given the same seed redraws the same elements), the straight-through gradient for the input and
// the LSQ gradient for the step.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(adaround, m) {
  m.def("fake_quantize_activation(Tensor input, Tensor scale, Tensor zero_point, int quant_min, "
        "int quant_max, float? clamp_min=None, float? clamp_max=None, float drop_probability=0.0, "
        "int drop_seed=0) -> Tensor");
  m.def("fake_quantize_activation_backward(Tensor grad_output, Tensor input, Tensor scale, Tensor zero_point, "
        "int quant_min, int quant_max, float? clamp_min=None, float? clamp_max=None, float drop_probability=0.0, "
        "int drop_seed=0, bool scale_grad=True) -> (Tensor, Tensor)");
}
