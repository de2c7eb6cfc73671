"""Per-layer checkpoints: a long run never loses finished work and resumes where it stopped."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from typing import Optional

import torch

MANIFEST = "manifest.json"
LAYER_FORMAT = "adaround_ext/layer/2"
log = logging.getLogger("adaround_ext")


def _atomic_write(path: str, write) -> None:
    """write(f) into a temporary file of this writer alone, then renamed over `path`: an interrupted
    write never leaves a half-written file, and two writers never share a temporary name."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(f"cannot write the checkpoint file {path!r}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _result_settings(config) -> bytes:
    # Settings that cannot change the result stay out: a run resumes with or without them. Defaults
    # that resolve by other fields are hashed resolved (quantized_inputs=None is True or False).
    settings = {k: v for k, v in config.to_dict().items() if k not in ("progress", "device", "cuda_graph")}
    settings["quantized_inputs"] = config.inputs_quantized
    del settings["inner_activations"]  # block-only: layer-wise runs resume across its introduction
    if config.reconstruction == "block":
        # Blocks saved before convolutions learned only their live taps (live_taps.py) do not resume.
        settings["block_taps"] = "live"
        if config.activations_in_reconstruction:  # without activation quantizers in the loop it changes nothing
            settings["inner_activations"] = config.inner_activations_quantized
    return json.dumps(settings, sort_keys=True).encode()


def config_tag(config) -> str:
    """Short hash of the settings that determine the result: names a checkpoint directory per configuration."""
    return hashlib.sha256(_result_settings(config)).hexdigest()[:8]


def fingerprint(model: torch.nn.Module, samples: torch.Tensor, config) -> str:
    """Hash of what determines the result: weights, calibration samples and configuration."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    h.update(samples.contiguous().numpy().tobytes())
    h.update(_result_settings(config))
    return h.hexdigest()


class Checkpoint:
    """One file per finished layer or block. Each holds the run's fingerprint and a SHA-256 of its payload: a
    file that was damaged, truncated or copied in from another run is not trusted; its layer is
    recomputed, and the log says why."""

    def __init__(self, directory: str, key: str):
        self.directory = directory
        self.key = key
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, MANIFEST)
        if os.path.exists(path):
            with open(path) as f:
                manifest = json.load(f)
            if manifest.get("fingerprint") != key:
                raise ValueError(f"checkpoint directory {directory!r} holds a run of a different model, calibration "
                                 f"data or configuration; use an empty directory")
        else:
            self._write_json(path, {"fingerprint": key})

    def _layer_path(self, name: str, kind: str) -> str:
        return os.path.join(self.directory, f"{kind}.{name}.pt")

    @staticmethod
    def _write_json(path, data):
        _atomic_write(path, lambda f: f.write(json.dumps(data).encode()))

    def load(self, name: str, kind: str = "layer") -> Optional[dict]:
        """The saved {"state", "report"} of the layer (kind "layer") or block (kind "block") `name`, or None
        (not saved, or not trusted: see the log)."""
        path = self._layer_path(name, kind)
        if not os.path.exists(path):
            return None
        try:
            outer = torch.load(path, weights_only=False, map_location="cpu")
            if not isinstance(outer, dict) or outer.get("format") != LAYER_FORMAT:
                raise ValueError("not a layer checkpoint of this version")
            if outer.get("fingerprint") != self.key or outer.get("layer") != name or outer.get("kind", "layer") != kind:
                raise ValueError("it belongs to another run or layer")
            if hashlib.sha256(outer["payload"]).hexdigest() != outer.get("sha256"):
                raise ValueError("its content does not match its SHA-256")
            return torch.load(io.BytesIO(outer["payload"]), weights_only=False, map_location="cpu")
        except Exception as exc:  # anything unreadable is recomputed, not trusted
            log.warning("checkpoint %s is not used (%s); %s %s is recomputed", path, exc, kind, name)
            return None

    def save(self, name: str, state: dict, report: dict, kind: str = "layer") -> None:
        buffer = io.BytesIO()
        torch.save({"state": state, "report": report}, buffer)
        payload = buffer.getvalue()
        outer = {"format": LAYER_FORMAT, "fingerprint": self.key, "layer": name, "kind": kind, "payload": payload,
                 "sha256": hashlib.sha256(payload).hexdigest()}
        _atomic_write(self._layer_path(name, kind), lambda f: torch.save(outer, f))
