// The AdaRound loop for one layer (docs/algorithm.md, docs/design.md#per-layer-loop), without an
// autograd graph: each iteration asks the layer's execution path (loop/execution_path.h) for
// dL/dW~, then takes the fused rounding step (adam_rounding_step_). The registration of
// torch.ops.adaround.optimize_layer is in optimize_layer_op.cpp.
#include "optimize_layer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/DeviceGuard.h>

#include "grid.h"
#include "iteration_graph.h"
#include "loop/active_weights.h"
#include "loop/backend_flags.h"
#include "loop/execution_path.h"
#include "loop/layer.h"
#include "loop/run_checks.h"
#include "rounding_ops.h"
#include "schedule.h"
#include "step_checks.h"

namespace adaround {
namespace {

using at::Tensor;

// The learned rounding variables shaped like the weight: transposed back where the loop learned them
// with axes 0 and 1 swapped, and with the columns the path did not learn (they never see data, so
// their reconstruction gradient is 0) decided on the nearest side (ties up).
Tensor full_v(const Tensor& learned_v, const Tensor& w, const QuantGrid& grid, std::optional<int64_t> axis,
              bool swapped, const Tensor& live_columns) {
  Tensor v = swapped ? learned_v.transpose(0, 1).contiguous() : learned_v;
  if (!live_columns.defined()) return v;
  Tensor decided = at::full_like(w, kSaturatedV).masked_fill_(ops::init_v(w, grid.scale, axis) < 0, -kSaturatedV);
  decided.view({w.size(0), -1}).index_copy_(1, live_columns, v);
  return decided;
}

}  // namespace

OptimizeResult optimize_layer(const Tensor& weight, const std::optional<Tensor>& bias, const LayerGrid& grid_args,
                              const Tensor& inputs, const Tensor& targets, const LayerGeometry& geometry,
                              const OptimizeOptions& opt) {
  loop::check_options(opt);
  const Activation act = parse_activation(opt.activation);
  const loop::Layer layer = loop::check_layer(weight, bias, inputs, targets, geometry);
  const int64_t n = inputs.size(0);
  // Kernels go to the current device's streams: make that the weight's device (which need not be the
  // current one) for the whole loop.
  const c10::OptionalDeviceGuard on_weight_device(weight.device());
  const bool cpu_paths = loop::cpu_paths_allowed(weight);
  const QuantGrid grid = make_grid(weight, grid_args.scale, grid_args.zero_point, grid_args.quant_min,
                                   grid_args.quant_max, grid_args.axis, GridValueCheck::kAlways);
  loop::check_finite(inputs, "inputs");
  loop::check_finite(targets, "targets");
  loop::check_finite(weight, "weight");
  if (bias.has_value()) loop::check_finite(*bias, "bias");

  loop::BackendFlagsGuard flags(opt.allow_tf32);
  const auto work_dtype = compute_dtype(weight.scalar_type());
  const Tensor w = weight.to(work_dtype).contiguous();
  const std::optional<Tensor> b = bias.has_value() ? std::optional<Tensor>(bias->to(work_dtype)) : std::nullopt;
  const double norm = 1.0 / double(opt.batch_size * layer.positions);
  const loop::PathInputs path_inputs{layer, w, b, inputs, targets, grid_args.axis, act, opt.activation,
                                     opt.batch_size, norm};
  const std::unique_ptr<loop::ExecutionPath> path = loop::choose_path(path_inputs, opt, cpu_paths);
  const Tensor live_columns = path->live_columns();

  // ActiveWeights packs by channel, which must then be the outermost dimension: a transposed
  // convolution's per-channel grid is on axis 1, so its rounding is learned with axes 0 and 1 swapped.
  const bool swapped =
      layer.transposed && grid_args.axis.has_value() && at::maybe_wrap_dim(*grid_args.axis, w.dim()) == 1;
  const Tensor w_learned = live_columns.defined() ? w.view({w.size(0), -1}).index_select(1, live_columns).contiguous()
                           : swapped              ? w.transpose(0, 1).contiguous()
                                                  : w;
  ActiveWeights state(w_learned, grid.scale, grid.zero_point, grid.qmin, grid.qmax,
                      swapped ? std::optional<int64_t>(0) : grid_args.axis, opt.pack_frozen && cpu_paths);

  const int64_t log_every = opt.log_every > 0 ? opt.log_every : std::max<int64_t>(1, opt.iterations / 100);
  Tensor loss_curve = at::zeros({(opt.iterations + log_every - 1) / log_every}, w.options().dtype(at::kFloat));

  // Minibatch rows come from a CPU generator on every device, so a seed picks the same rows
  // everywhere; a device loop copies them over kRowChunk iterations at a time (DeviceSchedule).
  at::Generator gen = at::detail::getDefaultCPUGenerator().clone();
  gen.set_current_seed(uint64_t(opt.seed));
  const auto index_options = inputs.options().dtype(at::kLong);
  const bool streamed = inputs.device() != w.device();
  // Caches on the loop's device, outside the CPU paths: iterations read their rows and scalars from
  // memory (what a CUDA graph needs).
  std::optional<DeviceSchedule> device_schedule;
  if (!cpu_paths && !streamed) device_schedule.emplace(opt, n, w.device());

  // One iteration: dL/dW~ from the path, the sampled loss when log_now, and the step.
  auto iterate = [&](int64_t t, bool log_now) {
    const double lambda = lambda_at(opt, t);
    const double beta = beta_at(opt, t);
    Tensor rows;
    if (!path->full_data()) {
      rows = device_schedule ? device_schedule->rows() : at::randint(n, {opt.batch_size}, gen, index_options);
    }
    const Tensor w_soft = swapped ? state.soft_weight().transpose(0, 1) : state.soft_weight();
    Tensor loss;
    Tensor grad_w = path->gradient(w_soft, rows, log_now ? &loss : nullptr);
    if (log_now) {
      if (lambda > 0) loss = loss + lambda * state.regularizer(beta);
      loss_curve.select(0, t / log_every).copy_(loss);  // device-side copy: no host sync
      // In CPU memory the sampled loss is free to read: stop at the first non-finite one.
      if (loss.is_cpu()) loop::check_finite_loss(loss.item<double>(), t);
    }
    if (swapped) grad_w = grad_w.transpose(0, 1).contiguous();
    if (device_schedule) {
      state.step_scheduled(grad_w, device_schedule->scalars(), opt.lr, kAdamBeta1, kAdamBeta2, kAdamEps);
      device_schedule->advance();
    } else {
      state.step(grad_w, lambda, beta, opt.lr, kAdamBeta1, kAdamBeta2, kAdamEps, t + 1);
    }
  };

  // Iterations that log run eagerly; the others replay one captured iteration. The graph exists
  // from before the first iteration to after the last (see make_iteration_graph).
  std::unique_ptr<IterationGraph> graph =
      opt.cuda_graph && device_schedule.has_value() ? make_iteration_graph(w.device()) : nullptr;
  bool captured = false;
  if (opt.on_progress) opt.on_progress(0, opt.iterations);
  for (int64_t t = 0; t < opt.iterations; ++t) {
    const bool log_now = t % log_every == 0;
    if (t > 0 && t % ActiveWeights::kRepackEvery == 0) state.repack();
    if (device_schedule && !path->full_data()) device_schedule->draw_rows(t, gen);
    if (graph && !log_now && !captured) {
      // The captured iteration takes everything that changes from memory; it is given no real t, so
      // that a use of t would show as a difference from the eager loop (also in the emulation, whose
      // replays run this closure again).
      captured = graph->capture([&] { iterate(/*t=*/-1, false); });
      if (!captured) graph.reset();
    }
    if (captured && !log_now) {
      graph->replay();
    } else {
      iterate(t, log_now);
    }
    if (opt.on_progress) opt.on_progress(t + 1, opt.iterations);
  }
  graph.reset();  // the caller's stream goes on after the iterations
  loop::check_finite_run(loss_curve, state.v(), log_every);

  OptimizeResult result;
  result.v = full_v(state.v(), w, grid, grid_args.axis, swapped, live_columns);
  result.loss_curve = loss_curve;
  result.exact_mode = path->full_data();
  auto [codes, quantized] = ops::hard_quantize(weight, grid.scale, grid.zero_point, grid.qmin, grid.qmax,
                                               grid_args.axis, "adaptive", result.v.to(work_dtype));
  result.codes = codes;
  result.quantized_weight = quantized;
  const Tensor nearest = std::get<1>(ops::hard_quantize(weight, grid.scale, grid.zero_point, grid.qmin,
                                                        grid.qmax, grid_args.axis, "nearest"));
  result.nearest_error = loop::reconstruction_error(layer, act, nearest.to(work_dtype), b, inputs, targets);
  result.adaround_error = loop::reconstruction_error(layer, act, quantized.to(work_dtype), b, inputs, targets);
  const Tensor stretched = at::sigmoid(result.v) * (kZeta - kGamma) + kGamma;
  result.undecided_fraction = at::logical_and(stretched > 0, stretched < 1).to(at::kDouble).mean().item<double>();
  return result;
}

}  // namespace adaround
