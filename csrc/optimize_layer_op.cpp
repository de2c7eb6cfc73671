// torch.ops.adaround.optimize_layer: the schema, and the flat-argument form of adaround::optimize_layer.
#include <torch/library.h>

#include "optimize_layer.h"
#include "optimize_options.h"
#include "progress.h"

namespace adaround {
namespace {

using at::Tensor;

// The op's options arrive as typed arguments, in ADAROUND_OPTIMIZE_OPTIONS order.
#define ADAROUND_PARAMETER(type, name) , op_arg_t<type> name
#define ADAROUND_ASSIGN(type, name) options.name = type(name);

template <typename T>
struct OpArg { using type = T; };
template <>
struct OpArg<std::string> { using type = c10::string_view; };
template <typename T>
using op_arg_t = typename OpArg<T>::type;

std::tuple<Tensor, Tensor, Tensor, Tensor, double, double, double, bool> optimize_layer_op(
    const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& scale,
    const std::optional<Tensor>& zero_point, int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis,
    const Tensor& inputs, const Tensor& targets, std::vector<int64_t> stride, std::vector<int64_t> padding,
    std::vector<int64_t> dilation, int64_t groups ADAROUND_OPTIMIZE_OPTIONS(ADAROUND_PARAMETER), bool transposed,
    std::vector<int64_t> output_padding) {
  OptimizeOptions options;
  ADAROUND_OPTIMIZE_OPTIONS(ADAROUND_ASSIGN)
  options.on_progress = progress::report;
  const OptimizeResult r = optimize_layer(weight, bias, LayerGrid{scale, zero_point, quant_min, quant_max, axis},
                                          inputs, targets,
                                          LayerGeometry{stride, padding, dilation, groups, transposed, output_padding},
                                          options);
  return {r.quantized_weight, r.codes, r.v,           r.loss_curve, r.nearest_error, r.adaround_error,
          r.undecided_fraction, r.exact_mode};
}

#undef ADAROUND_PARAMETER
#undef ADAROUND_ASSIGN

}  // namespace
}  // namespace adaround

TORCH_LIBRARY_FRAGMENT(adaround, m) {
  m.def(("optimize_layer(Tensor weight, Tensor? bias, Tensor scale, Tensor? zero_point, int quant_min, "
         "int quant_max, int? axis, Tensor inputs, Tensor targets, int[] stride=[1], int[] padding=[0], "
         "int[] dilation=[1], int groups=1, " +
         adaround::optimize_options_schema() +
         ", bool transposed=False, int[] output_padding=[0]) -> "
         "(Tensor quantized_weight, Tensor codes, Tensor v, Tensor loss_curve, "
         "float nearest_error, float adaround_error, float undecided_fraction, bool exact_mode)")
            .c_str());
  // One implementation for every backend: the loop dispatches its pieces by device.
  m.impl("optimize_layer", torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd,
                                           TORCH_FN(adaround::optimize_layer_op)));
}
