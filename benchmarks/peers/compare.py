"""adaround_ext side by side with Qualcomm AIMET and the plain-PyTorch reference loop, on the same work:
the Fashion-MNIST resnet18 checkpoint, the same 1024 calibration images, bit widths, granularity,
iterations, batch size (32), lambda (0.01), beta 20 -> 2, warm start 0.2, Adam lr 1e-3.

    .venv/bin/python benchmarks/peers/compare.py                       # w4a8,w3-pt at 1k iterations
    .venv/bin/python benchmarks/peers/compare.py --iterations 10000 --settings w4a8,w3-pt,w2-pc

- adaround_ext: adaround_ext.quantize with the product defaults (mode auto: the exact Gram mode where
  the loss has no activation and it is cheaper).
- plain PyTorch: the same pipeline (same caches, same grids) with optimize_layer swapped for the
  autograd + torch.optim.Adam loop of python/adaround_testbed/reference.py (always minibatch).
- AIMET: aimet-torch in its own venv (setup_aimet.sh), run by aimet_run.py; its own BN folding, grid
  (tf_enhanced ~ our weight-MSE, tf = min-max) and activation placement (op outputs).
If AIMET cannot be installed or run, the table says so and the error is printed and saved.
Results: runs/peers/results.json and runs/peers/table.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402,F401  (puts python/ on the path)

import torch  # noqa: E402

import adaround_ext as ae  # noqa: E402
import importlib  # noqa: E402

pipeline = importlib.import_module("adaround_ext.quantize")  # the module (the package exports a function of that name)
from adaround_testbed import reference  # noqa: E402
from adaround_testbed import testbed  # noqa: E402
from adaround_testbed.cli import SETTINGS, load_fashion_model  # noqa: E402
from adaround_ext import LayerResult  # noqa: E402

AIMET_PYTHON = os.path.join(HERE, ".venv-aimet", "bin", "python")


def reference_optimize_layer(weight, bias, scale, zero_point, quant_min, quant_max, axis, inputs, targets,
                             stride=(1,), padding=(0,), dilation=(1,), groups=1, progress=None, **o):
    """Drop-in for adaround_ext.optimize_layer running the plain-PyTorch loop (same math, autograd)."""
    geometry = {} if weight.dim() == 2 else dict(stride=tuple(stride), padding=tuple(padding),
                                                  dilation=tuple(dilation), groups=groups)
    v, losses = reference.adaround_loop(weight, bias, scale, zero_point, quant_min, quant_max, axis, inputs, targets,
                                        geometry, o["iterations"], o["batch_size"], o["lr"], o["reg_lambda"],
                                        o["warm_start"], o["activation"], o["seed"], record_losses=False)
    codes, quantized = reference.hard_quantize(weight, scale, zero_point, quant_min, quant_max, axis, "adaptive", v)
    nearest = reference.hard_quantize(weight, scale, zero_point, quant_min, quant_max, axis, "nearest")[1]
    act = reference.ACTIVATIONS[o["activation"]]

    def error(w):
        with torch.no_grad():
            total = sum((act(reference.layer_forward(x, w, bias, geometry)) - y).pow(2).sum().item()
                        for x, y in zip(inputs.split(256), targets.split(256)))
        return total / targets[:, 0].numel()

    stretched = reference.h(v)
    undecided = ((stretched > 0) & (stretched < 1)).double().mean().item()
    dtype = torch.int8 if quant_min < 0 else torch.uint8
    return LayerResult(quantized, codes.to(dtype), v, losses, error(nearest), error(quantized), undecided, False)


def run_pipeline(model, calib, test, config, swap_reference=False):
    original = pipeline.optimize_layer
    if swap_reference:
        pipeline.optimize_layer = reference_optimize_layer
    try:
        start = time.perf_counter()
        q = ae.quantize(model, calib, config)
        total = time.perf_counter() - start
    finally:
        pipeline.optimize_layer = original
    t_eval = time.perf_counter()
    accuracy = testbed.evaluate(q, *test)
    r = q.adaround_report
    return {"accuracy": accuracy, "total_s": total, "cache_s": r.cache_seconds, "optimize_s": r.optimize_seconds,
            "eval_s": time.perf_counter() - t_eval,
            "layers": [dict(shape=list(l.shape), total_s=l.seconds + l.cache_seconds, optimize_s=l.seconds,
                            cache_s=l.cache_seconds, errors=[l.nearest_error, l.adaround_error], mode=l.mode)
                       for l in r.layers]}


def ensure_aimet(log):
    if os.path.exists(AIMET_PYTHON):
        check = subprocess.run([AIMET_PYTHON, "-c", "import aimet_torch"], capture_output=True, text=True)
        if check.returncode == 0:
            return None
    log("installing aimet-torch into benchmarks/peers/.venv-aimet (setup_aimet.sh) ...")
    setup = subprocess.run(["bash", os.path.join(HERE, "setup_aimet.sh")], capture_output=True, text=True)
    if setup.returncode != 0:
        return f"setup_aimet.sh failed (exit {setup.returncode}): {(setup.stdout + setup.stderr)[-2000:]}"
    return None


def torch_experimental_adaround():
    """Whether the installed torch still ships its experimental AdaRound (the fallback peer)."""
    try:
        from torch.ao.quantization.experimental import adaround_fake_quantize  # noqa: F401

        return "torch.ao.quantization.experimental.adaround_fake_quantize is importable"
    except ImportError as exc:
        return f"not available in torch {torch.__version__}: {exc}"


def run_aimet(work_path, setting, iterations, out_dir, log):
    out = os.path.join(out_dir, f"aimet_{setting}_it{iterations}.json")
    proc = subprocess.run([AIMET_PYTHON, os.path.join(HERE, "aimet_run.py"), "--work", work_path, "--setting",
                           setting, "--iterations", str(iterations), "--out", out], capture_output=True, text=True)
    if not os.path.exists(out):
        return {"tool": "AIMET", "error": f"aimet_run.py exit {proc.returncode}: {proc.stderr[-2000:]}"}
    with open(out) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="w4a8,w3-pt")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--tools", default="adaround_ext,reference,aimet")
    p.add_argument("--out", default=os.path.join(common.ROOT, "runs", "peers"))
    p.add_argument("--model-checkpoint", default=os.path.join(common.ROOT, "runs", "fashion_mnist_resnet18.pt"))
    args = p.parse_args()
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    os.makedirs(args.out, exist_ok=True)
    tools = args.tools.split(",")
    settings = args.settings.split(",")

    model = load_fashion_model(types.SimpleNamespace(model_checkpoint=args.model_checkpoint, arch="resnet18",
                                                     out=os.path.dirname(args.model_checkpoint), train_epochs=3), log)
    train_x, _ = testbed.fashion_mnist("train")
    calib = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[: args.samples]]
    test = testbed.fashion_mnist("test")
    base = dict(iterations=args.iterations, num_samples=args.samples, batch_size=32, reg_lambda=0.01,
                device="cpu", progress=False, seed=0)
    work_path = os.path.join(args.out, "work.pt")
    torch.save({"state_dict": model.state_dict(), "calib": calib, "test_x": test[0], "test_y": test[1],
                "batch_size": 32, "reg_lambda": 0.01,
                "settings": {name: SETTINGS[name][1] for name in SETTINGS}}, work_path)

    aimet_error = ensure_aimet(log) if "aimet" in tools else None
    if aimet_error:
        log(f"AIMET unavailable: {aimet_error}\ntorch's own experimental AdaRound: {torch_experimental_adaround()}")

    results = []
    for setting in settings:
        description, overrides = SETTINGS[setting]
        config = ae.QuantConfig(**overrides, **base)
        for tool in tools:
            log(f"[{setting}] {tool} ...")
            if tool == "adaround_ext":
                r = run_pipeline(model, calib, test, config)
            elif tool == "reference":
                r = run_pipeline(model, calib, test, config, swap_reference=True)
            elif aimet_error:
                r = {"error": aimet_error}
            else:
                r = run_aimet(work_path, setting, args.iterations, args.out, log)
            r.update(tool={"adaround_ext": "adaround_ext", "reference": "plain PyTorch", "aimet": "AIMET"}[tool],
                     setting=setting, description=description)
            if "error" in r:
                log(f"  error: {r['error'].splitlines()[0]}")
            else:
                log(f"  accuracy {r['accuracy']:.2f}%, {r['total_s']:.0f} s (cache {r['cache_s']:.0f}, "
                    f"optimisation {r['optimize_s']:.0f})")
            results.append(r)
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump(results, f, indent=1)  # after every run: a long comparison never loses finished work

    table = format_table(results, args, model_fp32=testbed.evaluate(model, *test))
    log("\n" + table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")


def format_table(results, args, model_fp32):
    ours = {r["setting"]: r for r in results if r["tool"] == "adaround_ext" and "error" not in r}
    header = ("tool", "setting", "accuracy %", "total s", "cache s", "optimisation s", "s/layer",
              "median err ratio", "time vs adaround_ext")
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["tool"], r["setting"], "n/a", "-", "-", "-", "-", "-", r["error"].splitlines()[0][:80]))
            continue
        ratios = [e[-1] / e[0] for e in (l["errors"] for l in r["layers"]) if len(e) >= 2 and e[0]]
        base = ours.get(r["setting"])
        rows.append((r["tool"], r["setting"], f"{r['accuracy']:.2f}", f"{r['total_s']:.0f}", f"{r['cache_s']:.0f}",
                     f"{r['optimize_s']:.0f}", f"{r['total_s'] / max(1, len(r['layers'])):.1f}",
                     f"{statistics.median(ratios):.3f}" if ratios else "-",
                     f"{r['total_s'] / base['total_s']:.2f}x" if base else "-"))
    lines = [f"resnet18 on Fashion-MNIST (FP32 {model_fp32:.2f}%), {args.iterations} iterations/layer, "
             f"{args.samples} calibration images, batch 32, seed 0, {torch.get_num_threads()} CPU threads",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("median err ratio: per-layer reconstruction error after AdaRound / with nearest rounding, as "
                 "each tool measures it (ours and the reference: the whole cache; AIMET: its first batch).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
