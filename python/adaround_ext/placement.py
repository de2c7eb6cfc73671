"""Where activation quantizers sit (QuantConfig.activation_placement, docs/design.md#activation-placement).

"inputs": one quantizer on the input of each quantized layer (QuantizedLayer.input_quantizer).
"outputs": quantizers on op outputs, as AIMET's default configuration and integer runtimes place
them: the model input, every ReLU/ReLU6 output, every Conv/Linear and residual-addition output not
followed by one (a fused pair is quantized once, after the activation) and every average pooling
output. Max pooling, flattening and dropout move quantized values without making new ones.

For "outputs" the model becomes a torch.fx GraphModule with a node per quantizer, calling a module in
its `activation_quantizers` ModuleDict. Each quantizer also records the AIMET name of the tensor it
quantizes, (module, "input" | "output", index), named as aimet_torch.model_preparer names the
modules of a prepared model: a module called more than once gets "<parent>.module_<child>_<k>"
for its later calls, a functional op "<scope>.module_<node name>".
"""
from __future__ import annotations

import copy
import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .modules import ActivationQuantizer, ChannelClip, LeafTracer, QuantizedLayer

PLACEMENTS = ("inputs", "outputs")
SLOTS = "activation_quantizers"  # the ModuleDict of a GraphModule with output quantizers
AimetKey = Tuple[str, str, int]  # (module name in AIMET's prepared model, "input" | "output", index)

_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, ChannelClip)
_ACTIVATION_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.hardtanh)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_AVERAGE_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_AVERAGE_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)
_PASS_THROUGH = (nn.Identity, nn.Dropout)  # folded BatchNorm, and dropout in eval mode


class _ScopeTracer(LeafTracer):
    """Records for each node the module whose forward created it (the scope aimet_torch names new
    modules after)."""

    def __init__(self):
        super().__init__()
        self.module_scope = ""
        self.node_scope: Dict[str, str] = {}

    def call_module(self, m, forward, args, kwargs):
        outer, self.module_scope = self.module_scope, self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.module_scope = outer

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        self.node_scope[node.name] = self.module_scope
        return node


class QuantizedGraphModule(fx.GraphModule):
    """A GraphModule that keeps the adaround_* attributes (report, folded BatchNorms, channel clips)
    through copy.deepcopy, which GraphModule otherwise drops."""

    def __deepcopy__(self, memo):
        result = super().__deepcopy__(memo)
        for key, value in self.__dict__.items():
            if key.startswith("adaround_"):
                setattr(result, key, copy.deepcopy(value, memo))
        _restore_slots(result)
        return result


def _restore_slots(model: fx.GraphModule) -> None:
    """GraphModule rebuilds the path of every called submodule with plain Modules; the slots' parent
    becomes a ModuleDict again (output_quantizer_slots and set_output_quantizers rely on it)."""
    parent = getattr(model, SLOTS)
    if not isinstance(parent, nn.ModuleDict):
        setattr(model, SLOTS, nn.ModuleDict(dict(parent.named_children())))


def _module(modules, node) -> Optional[nn.Module]:
    return modules.get(node.target) if node.op == "call_module" else None


def _is_activation(modules, node) -> bool:
    if node.op == "call_module":
        m = modules.get(node.target)
        return isinstance(m, _ACTIVATION_MODULES) and (type(m) is not nn.Hardtanh or m.min_val == 0.0)
    return (node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("relu", "relu_"))


def _is_add(node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("add", "add_"))


def _is_average(modules, node) -> bool:
    return isinstance(_module(modules, node), _AVERAGE_MODULES) or (
        node.op == "call_function" and node.target in _AVERAGE_FUNCTIONS)


def _fused_with_activation(modules, node) -> bool:
    """Whether the node's output reaches only an activation (through folded BatchNorms and dropout):
    AIMET's supergroups quantize such a pair once, after the activation."""
    current = node
    while len(current.users) == 1:
        user = next(iter(current.users))
        if _is_activation(modules, user):
            return True
        if not isinstance(_module(modules, user), _PASS_THROUGH):
            return False
        current = user
    return False


def _aimet_names(graph: fx.Graph, node_scope: Dict[str, str]) -> Dict[fx.Node, str]:
    """The name of the module each node is in AIMET's prepared model (model_preparer's rules)."""
    names, seen = {}, set()
    for node in graph.nodes:
        scope = node_scope.get(node.name, "")
        if node.op == "call_module":
            if node.target not in seen:
                seen.add(node.target)
                names[node] = node.target
                continue
            parent, _, child = node.target.rpartition(".")
            name = f"module_{child}_{node.name.rsplit('_', 1)[1]}"
            names[node] = f"{parent}.{name}" if parent else name
        elif node.op in ("call_function", "call_method"):
            names[node] = f"{scope}.module_{node.name}" if scope else f"module_{node.name}"
    return names


def _slot_key(aimet_key: AimetKey) -> str:
    """The ModuleDict key of a quantizer: its AIMET name without dots."""
    module, kind, index = aimet_key
    return f"{module.replace('.', '__')}__{kind}{index}"


def place_output_quantizers(model: nn.Module) -> QuantizedGraphModule:
    """`model` (with QuantizedLayers) as a QuantizedGraphModule with an empty slot (nn.Identity) where
    each output quantizer goes; calibrate and fill them with set_output_quantizers. The same model
    always gives the same slots, so a saved model's quantizers load into a freshly placed one."""
    tracer = _ScopeTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise ValueError(f"activation_placement='outputs' needs a model torch.fx can trace: {exc}") from exc
    modules = dict(model.named_modules())
    names = _aimet_names(graph, tracer.node_scope)
    targets: List[Tuple[fx.Node, AimetKey]] = []
    for node in graph.nodes:
        if node.op == "placeholder":
            consumer = next((u for u in node.users if u in names and node in u.args), None)
            if consumer is None:
                raise ValueError(f"activation_placement='outputs': the model input {node.name!r} is not an "
                                 f"argument of a module or function")
            targets.append((node, (names[consumer], "input", list(consumer.args).index(node))))
        elif _is_activation(modules, node) or _is_average(modules, node):
            targets.append((node, (names[node], "output", 0)))
        elif (isinstance(_module(modules, node), QuantizedLayer) or _is_add(node)) and not _fused_with_activation(
                modules, node):
            targets.append((node, (names[node], "output", 0)))
    slots = nn.ModuleDict()
    for node, aimet_key in targets:
        key = _slot_key(aimet_key)
        slots[key] = nn.Identity()
        with graph.inserting_after(node):
            slot = graph.call_module(f"{SLOTS}.{key}", (node,))
        node.replace_all_uses_with(slot, delete_user_cb=lambda user: user is not slot)
    root = nn.Module()  # the model's children, parameters and buffers plus the slots; the model is untouched
    root._modules.update(model._modules)
    root._parameters.update(model._parameters)
    root._buffers.update(model._buffers)
    root.add_module(SLOTS, slots)
    placed = QuantizedGraphModule(root, graph, class_name=type(model).__name__)
    placed.training = model.training
    _restore_slots(placed)
    placed.adaround_aimet_keys = {_slot_key(k): k for _, k in targets}
    return placed


def output_quantizer_slots(model: nn.Module) -> Dict[str, nn.Module]:
    """{slot key: module} of a model with output quantizers; {} for "inputs" placement."""
    slots = getattr(model, SLOTS, None)
    return dict(slots.items()) if isinstance(slots, nn.ModuleDict) else {}


def aimet_key_of(model: nn.Module, slot: str) -> AimetKey:
    return tuple(model.adaround_aimet_keys[slot])


def set_output_quantizers(model: nn.Module, quantizers: Dict[str, ActivationQuantizer]) -> None:
    slots = getattr(model, SLOTS)
    for key, quantizer in quantizers.items():
        if key not in slots:
            raise ValueError(f"the model has no output quantizer {key!r}")
        slots[key] = quantizer
