"""Loads adaround_ext's AIMET export with AIMET's own API and writes the simulated model's predictions;
executed by the AIMET venv's Python (benchmarks/peers/.venv-aimet, setup_aimet.sh), never by the
project's. roundtrip.py drives it and compares.

    .venv-aimet/bin/python aimet_load.py --arch resnet18 --stem runs/x/resnet18_w4a8 --images images.pt --out r.json

AIMET's documented flow, strict: prepare the fresh torchvision model, fold its BatchNorms, load the
rounded weights (strict state dict), build the QuantizationSimModel from the exported config, (for
activation_placement="inputs") add the layers' input quantizers, load the encodings with strict=True
(every encoding must find its quantizer) and partial=False (quantizers the file does not name are
removed).
"""
import argparse
import json
import traceback

import torch


def add_input_quantizers(sim, encodings):
    """activation_placement="inputs": a quantizer on each input the encodings name, added with the
    quantized modules' API (a quantsim configuration cannot express a quantizer on one consumer's view of
    a tensor that others read unquantized)."""
    from aimet_torch.quantization.affine import QuantizeDequantize

    modules = dict(sim.model.named_modules())
    for name, kinds in encodings["activation_encodings"].items():
        for index, entry in kinds.get("input", {}).items():
            quantizers = modules[name].input_quantizers
            if quantizers[int(index)] is None:
                quantizers[int(index)] = QuantizeDequantize(shape=(), bitwidth=entry["bitwidth"],
                                                            symmetric=entry["is_symmetric"] == "True")


def run(args):
    import torchvision
    from aimet_common.defs import QuantScheme
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from aimet_torch.model_preparer import prepare_model
    from aimet_torch.quantsim import QuantizationSimModel

    images = torch.load(args.images)
    dummy = images[:1]
    model = getattr(torchvision.models, args.arch)(num_classes=10).eval()
    prepared = prepare_model(model)
    fold_all_batch_norms(prepared, input_shapes=tuple(dummy.shape))
    prepared.load_state_dict(torch.load(args.stem + ".aimet_weights.pth"), strict=True)
    with open(args.stem + ".encodings.json") as f:
        encodings = json.load(f)
    bits = {e["bitwidth"] for entries in encodings["param_encodings"].values() for e in entries}
    sim = QuantizationSimModel(prepared, dummy, quant_scheme=QuantScheme.post_training_tf,
                               default_param_bw=max(bits), default_output_bw=8,
                               config_file=args.stem + ".aimet_config.json")
    add_input_quantizers(sim, encodings)
    sim.load_encodings(args.stem + ".encodings.json", strict=True, partial=False)
    activation_quantizers = sum(q is not None for m in sim.qmodules()
                                for q in [*m.input_quantizers, *m.output_quantizers])
    weight_quantizers = sum(q is not None for m in sim.qmodules() for q in m.param_quantizers.values())
    with torch.no_grad():
        logits = torch.cat([sim.model(batch) for batch in images.split(500)])
    return {"predictions": logits.argmax(1).tolist(), "logits": logits.tolist(), "activation_quantizers": activation_quantizers,
            "weight_quantizers": weight_quantizers}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", required=True)
    p.add_argument("--stem", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    try:
        result = run(args)
    except Exception as exc:  # the driver reports why AIMET refused the files
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
