"""Runs Qualcomm AIMET's AdaRound on the work prepared by compare.py; executed by the AIMET venv's
Python (benchmarks/peers/.venv-aimet), never by the project's. Writes one JSON result.

    .venv-aimet/bin/python aimet_run.py --work runs/peers/work.pt --setting w4a8 --iterations 1000 --out r.json

Timing: AIMET caches a layer's inputs inside its optimisation call, so the per-layer time is split by
timing ActivationSampler.sample_and_place_all_acts_on_cpu (caching) inside AdaroundOptimizer
._optimize_rounding (caching + iterations). Reconstruction errors are AIMET's own (MSE on its first
cached batch, before = nearest rounding of the initial alpha, after = hard AdaRound).
"""
import argparse
import json
import os
import tempfile
import time
import traceback

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--setting", required=True)
    p.add_argument("--iterations", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    result = {"tool": "AIMET", "setting": args.setting}
    try:
        result.update(run(args))
    except Exception as exc:  # the comparison reports why AIMET could not run
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


def run(args):
    import aimet_torch
    from aimet_common.defs import QuantScheme
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
    from aimet_torch._base.adaround import adaround_optimizer as opt_mod
    from aimet_torch._base.adaround import activation_sampler as sampler_mod
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from aimet_torch.model_preparer import prepare_model
    from aimet_torch.quantsim import QuantizationSimModel
    import torchvision

    torch.set_num_threads(os.cpu_count() or 1)
    work = torch.load(args.work, weights_only=False)
    setting = work["settings"][args.setting]
    calib, test_x, test_y = work["calib"], work["test_x"], work["test_y"]
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(work["state_dict"])
    model.eval()
    dummy = calib[:1]

    config_dir = os.path.join(os.path.dirname(aimet_torch.__file__), "common", "quantsim_config")
    config_file = os.path.join(config_dir, "default_config_per_channel.json" if setting["per_channel"]
                               else "default_config.json")
    scheme = QuantScheme.post_training_tf_enhanced if setting["scale_method"] == "mse" else QuantScheme.post_training_tf

    # Per-layer timing and AIMET's own reconstruction errors, by wrapping its internals.
    layers, current = [], {}
    orig_adaround_module = opt_mod.AdaroundOptimizer.adaround_module.__func__
    orig_optimize = opt_mod.AdaroundOptimizer._optimize_rounding.__func__
    orig_metrics = opt_mod.AdaroundOptimizer._compute_recons_metrics.__func__
    orig_sample_all = sampler_mod.ActivationSampler.sample_and_place_all_acts_on_cpu

    def adaround_module(cls, module, *a, **k):
        current.clear()
        current.update(errors=[], cache_s=0.0, shape=list(module.weight.shape))
        t = time.perf_counter()
        out = orig_adaround_module(cls, module, *a, **k)
        current["total_s"] = time.perf_counter() - t
        layers.append(dict(current))
        return out

    def optimize(cls, *a, **k):
        t = time.perf_counter()
        out = orig_optimize(cls, *a, **k)
        current["optimize_s"] = time.perf_counter() - t - current["cache_s"]
        return out

    def metrics(cls, *a, **k):
        hard, soft = orig_metrics(cls, *a, **k)
        current["errors"].append(hard)
        return hard, soft

    def sample_all(self, *a, **k):
        t = time.perf_counter()
        out = orig_sample_all(self, *a, **k)
        current["cache_s"] += time.perf_counter() - t
        return out

    opt_mod.AdaroundOptimizer.adaround_module = classmethod(adaround_module)
    opt_mod.AdaroundOptimizer._optimize_rounding = classmethod(optimize)
    opt_mod.AdaroundOptimizer._compute_recons_metrics = classmethod(metrics)
    sampler_mod.ActivationSampler.sample_and_place_all_acts_on_cpu = sample_all

    t0 = time.perf_counter()
    prepared = prepare_model(model)
    fold_all_batch_norms(prepared, input_shapes=tuple(dummy.shape))
    loader = torch.utils.data.DataLoader(calib, batch_size=work["batch_size"], shuffle=False)
    params = AdaroundParameters(data_loader=loader, num_batches=len(loader), default_num_iterations=args.iterations,
                                default_reg_param=work["reg_lambda"], default_beta_range=(20, 2),
                                default_warm_start=0.2)
    with tempfile.TemporaryDirectory() as tmp:
        t_ada = time.perf_counter()
        ada_model = Adaround.apply_adaround(prepared, dummy, params, path=tmp, filename_prefix="adaround",
                                            default_param_bw=setting["weight_bits"], default_quant_scheme=scheme,
                                            default_config_file=config_file)
        adaround_s = time.perf_counter() - t_ada
        sim = QuantizationSimModel(ada_model, dummy, quant_scheme=scheme, default_param_bw=setting["weight_bits"],
                                   default_output_bw=setting["activation_bits"] or 8, config_file=config_file)
        sim.set_and_freeze_param_encodings(encoding_path=os.path.join(tmp, "adaround.encodings"))
    if setting["activation_bits"] is None:  # weights only: drop every activation quantizer
        for qmodule in sim.qmodules():
            for quantizers in (qmodule.input_quantizers, qmodule.output_quantizers):
                for i in range(len(quantizers)):
                    quantizers[i] = None

    def forward_pass(m, _):
        with torch.no_grad():
            for batch in calib.split(128):
                m(batch)

    sim.compute_encodings(forward_pass, None)
    quantize_s = time.perf_counter() - t0
    t_eval = time.perf_counter()
    with torch.no_grad():
        predictions = torch.cat([sim.model(b).argmax(1) for b in test_x.split(500)])
    accuracy = 100.0 * (predictions == test_y).float().mean().item()
    return {"accuracy": accuracy, "total_s": quantize_s, "adaround_s": adaround_s,
            "cache_s": sum(l["cache_s"] for l in layers), "optimize_s": sum(l.get("optimize_s", 0.0) for l in layers),
            "eval_s": time.perf_counter() - t_eval, "layers": layers, "version": "aimet-torch " + _version()}


def _version():
    from importlib.metadata import version

    return version("aimet-torch")


if __name__ == "__main__":
    main()
