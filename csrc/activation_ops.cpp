// Schemas of the activation fake-quantization ops: block reconstruction's per-tensor input
// quantizers, with an optional clamp fused in front (a ReLU or ReLU6), QDrop's elements kept in
// float, and the straight-through gradients for the input and the LSQ gradient for the step.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(adaround, m) {
  m.def("fake_quantize_activation(Tensor input, Tensor scale, Tensor zero_point, int quant_min, "
        "int quant_max, float? clamp_min=None, float? clamp_max=None, Tensor? keep_float=None) -> Tensor");
  m.def("fake_quantize_activation_backward(Tensor grad_output, Tensor input, Tensor scale, Tensor zero_point, "
        "int quant_min, int quant_max, float? clamp_min=None, float? clamp_max=None, Tensor? keep_float=None, "
        "bool scale_grad=True) -> (Tensor, Tensor)");
}
