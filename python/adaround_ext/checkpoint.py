"""Per-layer checkpoints: a long run never loses finished work and resumes where it stopped."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch

MANIFEST = "manifest.json"


def _result_settings(config) -> bytes:
    # Settings that cannot change the result stay out: a run resumes with or without them.
    settings = {k: v for k, v in config.to_dict().items() if k not in ("progress", "device", "cuda_graph")}
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
    def __init__(self, directory: str, key: str):
        self.directory = directory
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

    def _layer_path(self, name: str) -> str:
        return os.path.join(self.directory, f"layer.{name}.pt")

    @staticmethod
    def _write_json(path, data):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)

    def load(self, name: str) -> Optional[dict]:
        path = self._layer_path(name)
        return torch.load(path, weights_only=False) if os.path.exists(path) else None

    def save(self, name: str, state: dict, report: dict) -> None:
        path = self._layer_path(name)
        tmp = path + ".tmp"
        torch.save({"state": state, "report": report}, tmp)
        os.replace(tmp, path)  # atomic: an interrupted save never leaves a half-written layer
