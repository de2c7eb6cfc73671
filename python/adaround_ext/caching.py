"""The per-layer caches of the layer walk: x^ (the layer's input in the partly quantized model) and
f_a(W x + b) (the FP layer's output), for every calibration sample.

Two ways to build them, with the same values:
- GraphWalkCaches (fx-traceable models whose layers are each called once): both models' traced graphs
  are evaluated node by node, keeping only the values that later nodes still read, and each layer's
  caches are read off where the walk has got to. Every node runs once per model: O(L) for L layers.
- PrefixCaches (any model): for each layer, both models run from the input up to that layer and
  stop there. O(L^2) forwards, but no memory beyond the layer's own caches.
make_layer_caches picks the walk when its live values fit in a share of the free memory.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .blocks import runs_channels_last
from .modules import trace

log = logging.getLogger("adaround_ext")

CHUNK = 128  # samples per forward call
_ACTIVATIONS = {"none": lambda t: t, "relu": F.relu, "relu6": F.relu6}
# Share of the free memory (device memory on CUDA, available RAM on the CPU) that the graph walk's live
# values of both models may take; the layer caches and the optimisation need the rest.
WALK_MEMORY_SHARE = 0.25


def cache_location(config, device, nbytes: int) -> str:
    """ "device" or "pinned host" for caches of `nbytes` (host only with a CUDA device)."""
    if device.type != "cuda" or config.cache_placement == "device":
        return "device"
    if config.cache_placement == "host":
        return "pinned host"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if nbytes < 0.6 * free else "pinned host"  # room left for the loop's own buffers


class _CacheWriter:
    """Fills the (inputs, targets) caches chunk by chunk, placed by cache_location on the first chunk;
    4-D caches laid out NHWC with `channels_last`."""

    def __init__(self, n, config, device, channels_last=False):
        self.n, self.config, self.device, self.channels_last = n, config, device, channels_last
        self.inputs = self.targets = None

    def write(self, start, x, y):
        if self.inputs is None:
            where = cache_location(self.config, self.device, self.n * (x[0].numel() + y[0].numel()) * 4)
            self.inputs, self.targets = (self._empty(t, where) for t in (x, y))
        self.inputs[start:start + len(x)].copy_(x, non_blocking=True)
        self.targets[start:start + len(y)].copy_(y, non_blocking=True)

    def write_chunks(self, inputs, targets):
        """Writes the samples' values chunk by chunk, in order from the first sample."""
        start = 0
        for x, y in zip(inputs, targets):
            self.write(start, x, y)
            start += len(x)

    def result(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the last device-to-host copies are done before the loop reads
        return self.inputs, self.targets

    def _empty(self, like, where):
        shape = (self.n, *like.shape[1:])
        layout = torch.channels_last if self.channels_last and len(shape) == 4 else torch.contiguous_format
        if where == "device":
            return torch.empty(shape, dtype=like.dtype, device=self.device, memory_format=layout)
        return torch.empty(shape, dtype=like.dtype, pin_memory=True, memory_format=layout)


class _StopForward(Exception):
    pass


def _capture(model: nn.Module, name: str, x: torch.Tensor, want_input: bool) -> torch.Tensor:
    """Runs `model` on x up to layer `name` and returns that layer's input or output."""
    box = {}

    def hook(module, args, output=None):
        box["value"] = args[0] if want_input else output
        raise _StopForward

    module = model.get_submodule(name)
    handle = module.register_forward_pre_hook(hook) if want_input else module.register_forward_hook(hook)
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "value" not in box:
        raise RuntimeError(f"layer {name} was not called by the forward pass")
    return box["value"]


class PrefixCaches:
    """Caches by rerunning each model from the input up to the layer, for every layer."""

    strategy = "prefix reruns"

    def __init__(self, q_model, fp_model, samples, config, device):
        self.q_model, self.fp_model, self.samples, self.config, self.device = q_model, fp_model, samples, config, device

    def build(self, name: str, activation: str):
        """(x^, f_a(W x + b)) of layer `name` over all samples: on the device, or in pinned host memory
        (see QuantConfig.cache_placement) from where optimize_layer streams minibatches to the GPU."""
        act = _ACTIVATIONS[activation]
        source = self.q_model if self.config.asymmetric_reconstruction else self.fp_model
        writer = _CacheWriter(len(self.samples), self.config, self.device)
        with torch.no_grad():
            for start in range(0, len(self.samples), CHUNK):
                batch = self.samples[start:start + CHUNK]
                # Copies: a model may change its input in place, and both runs read the same samples.
                x = _capture(source, name, batch.to(self.device, copy=True), want_input=True)
                y = act(_capture(self.fp_model, name, batch.to(self.device, copy=True), want_input=False))
                writer.write(start, x, y)
        return writer.result()

    def build_block(self, block):
        """(x^, the float block's output) of a block that is a module of the model (blocks.Block)."""
        source = self.q_model if self.config.asymmetric_reconstruction else self.fp_model
        writer = _CacheWriter(len(self.samples), self.config, self.device, runs_channels_last(block.nodes, self.device))
        with torch.no_grad():
            for start in range(0, len(self.samples), CHUNK):
                batch = self.samples[start:start + CHUNK]
                x = _capture(source, block.name, batch.to(self.device, copy=True), want_input=True)
                y = _capture(self.fp_model, block.name, batch.to(self.device, copy=True), want_input=False)
                writer.write(start, x, y)
        return writer.result()


class _GraphCursor:
    """Evaluates one model's traced graph node by node over chunks of samples. Modules are looked up
    when their node runs, so layers replaced in the model since the walk began are the ones used.
    Values are freed after their last reader; in-place modules (ReLU(inplace=True)) see the same
    values in the same order as in an eager forward pass."""

    def __init__(self, model: nn.Module, graph: fx.Graph, chunks: List[torch.Tensor], device, track_peak=False):
        self.model, self.chunks, self.device, self.track_peak = model, chunks, device, track_peak
        self.nodes = list(graph.nodes)
        index = {node: i for i, node in enumerate(self.nodes)}
        self.last_read = {node: max((index[u] for u in node.users), default=i) for i, node in enumerate(self.nodes)}
        self.values = {}
        self.position = 0  # the next node to run
        self.peak_bytes = 0  # with track_peak: most bytes kept at once, the running node's inputs and output included

    def run_until(self, stop: int) -> None:
        while self.position < stop:
            self.step()

    def step(self) -> List:
        """Runs the next node on every chunk and returns its values."""
        node, i = self.nodes[self.position], self.position
        out = [self._evaluate(node, c) for c in range(len(self.chunks))]
        self.values[node] = out
        if self.track_peak:
            self.peak_bytes = max(self.peak_bytes, self.live_bytes())
        for read in (*node.all_input_nodes, node):
            if self.last_read[read] == i:
                self.values.pop(read, None)
        self.position += 1
        return out

    def live_bytes(self) -> int:
        """Bytes of the sample-dependent tensors now kept (a tensor modified in place counted once)."""
        seen, total = set(), 0
        for node, chunks in self.values.items():
            if node.op == "get_attr":
                continue
            for t in chunks:
                if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        return total

    def _evaluate(self, node: fx.Node, c: int):
        if node.op == "placeholder":  # a copy: the model may change its input in place, and both walks read it
            return self.chunks[c].to(self.device, copy=True)
        if node.op == "output":
            return None
        if node.op == "get_attr":
            obj = self.model
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.values[n][c])
        if node.op == "call_module":
            return self.model.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise RuntimeError(f"cannot evaluate fx node {node.op}")


class GraphWalkCaches:
    """Caches read off one walk over the traced graphs of both models, in layer order."""

    strategy = "graph walk"

    def __init__(self, q_model, fp_model, samples, config, device, graph: fx.Graph):
        self.config, self.n, self.device = config, len(samples), device
        self.layer_node = {node.target: i for i, node in enumerate(graph.nodes) if node.op == "call_module"}
        chunks = list(samples.split(CHUNK))
        self.fp = _GraphCursor(fp_model, graph, chunks, device)
        self.q = _GraphCursor(q_model, graph, chunks, device) if config.asymmetric_reconstruction else self.fp

    def build(self, name: str, activation: str):
        """(x^, f_a(W x + b)) of layer `name`; layers must be asked for in execution order."""
        k = self.layer_node[name]
        if self.fp.position > k or self.q.position > k:
            raise RuntimeError(f"layer {name} was asked for after the walk passed it")
        act = _ACTIVATIONS[activation]
        writer = _CacheWriter(self.n, self.config, self.device)
        with torch.no_grad():
            self.q.run_until(k)
            inputs = self.q.values[self.q.nodes[k].args[0]]
            self.fp.run_until(k)
            outputs = self.fp.step()  # the layer itself
            writer.write_chunks(inputs, [act(y) for y in outputs])
        return writer.result()

    def build_block(self, block):
        """(x^, the float block's output) of a block (blocks.Block, whose node positions are those of
        this graph); blocks and layers must be asked for in execution order."""
        if self.fp.position > block.first or self.q.position > block.first:
            raise RuntimeError(f"block {block.name} was asked for after the walk passed it")
        writer = _CacheWriter(self.n, self.config, self.device, runs_channels_last(block.nodes, self.device))
        with torch.no_grad():
            self.q.run_until(block.first)
            # Copies: the float walk runs the block next, and it may change its input in place (the two
            # walks share the placeholder's values, and one walk is both without asymmetric reconstruction).
            inputs = [x.clone() for x in self.q.values[self.q.nodes[block.input_index]]]
            self.fp.run_until(block.last + 1)
            writer.write_chunks(inputs, self.fp.values[self.fp.nodes[block.last]])
        return writer.result()


def walkable_graph(model: nn.Module, layers: List[str]) -> Optional[fx.Graph]:
    """The traced graph of `model` when the walk can cache its layers: one input, and every layer
    called exactly once, in `layers` order, with its input as first argument. Else None."""
    try:
        graph = trace(model)
    except Exception:
        return None
    nodes = list(graph.nodes)
    if sum(node.op == "placeholder" for node in nodes) != 1:
        return None
    calls = [node for node in nodes if node.op == "call_module" and node.target in set(layers)]
    if [node.target for node in calls] != list(layers):
        return None
    if any(not node.args or not isinstance(node.args[0], fx.Node) for node in calls):
        return None
    return graph


def _free_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def walk_bytes(model: nn.Module, graph: fx.Graph, sample: torch.Tensor, device) -> int:
    """Peak bytes of the values the walk keeps for one sample, measured by walking it once."""
    cursor = _GraphCursor(model, graph, [sample[:1]], device, track_peak=True)
    with torch.no_grad():
        cursor.run_until(len(cursor.nodes))
    return cursor.peak_bytes


def make_layer_caches(q_model, fp_model, samples, config, device, layers: List[str],
                      memory_budget: Optional[int] = None):
    """GraphWalkCaches when the model can be walked and its live values (both models, all samples)
    fit in `memory_budget` bytes (default: WALK_MEMORY_SHARE of the free memory), else PrefixCaches."""
    graph = walkable_graph(fp_model, layers)
    if graph is None:
        log.info("caching: each layer reruns the models up to it (the model cannot be walked as one fx graph)")
        return PrefixCaches(q_model, fp_model, samples, config, device)
    models = 2 if config.asymmetric_reconstruction else 1
    needed = walk_bytes(fp_model, graph, samples, device) * len(samples) * models
    budget = int(WALK_MEMORY_SHARE * _free_memory(device)) if memory_budget is None else memory_budget
    if needed > budget:
        log.info("caching: each layer reruns the models up to it (one walk would keep %.0f MB, over the "
                 "%.0f MB allowed)", needed / 2**20, budget / 2**20)
        return PrefixCaches(q_model, fp_model, samples, config, device)
    log.info("caching: one walk over the model graph (keeps up to %.0f MB)", needed / 2**20)
    return GraphWalkCaches(q_model, fp_model, samples, config, device, graph)
