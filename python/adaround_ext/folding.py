"""BatchNorm folding: each BatchNorm that directly follows a conv is folded into it (and replaced
by nn.Identity), keeping the module tree of the model so that names stay the same."""
from __future__ import annotations

import logging
from collections import defaultdict

import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .layer_kinds import CONV_TYPES, kind_of
from .modules import set_submodule, trace

_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)
log = logging.getLogger("adaround_ext")


def conv_bn_pairs(model: nn.Module):
    """(conv name, bn name) for every BatchNorm that can be folded into a conv without changing the
    model: every call of the conv feeds only that BatchNorm, and every call of the BatchNorm reads
    only that conv. A conv also used elsewhere, or a BatchNorm after two convs, is kept (and logged)."""
    graph = trace(model)
    modules = dict(model.named_modules())
    calls = defaultdict(list)  # module name -> its call nodes
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target].append(node)
    pairs, kept = [], []
    for bn_name, bn_calls in calls.items():
        if not isinstance(modules.get(bn_name), _BNS):
            continue
        sources = {n.args[0].target if isinstance(n.args[0], fx.Node) and n.args[0].op == "call_module" else None
                   for n in bn_calls}
        conv_name = next(iter(sources)) if len(sources) == 1 else None
        if conv_name is None or not isinstance(modules.get(conv_name), CONV_TYPES):
            if any(isinstance(modules.get(src), CONV_TYPES) for src in sources):
                kept.append(f"{bn_name} (follows more than one conv)")
            continue
        feeds_only_bn = all(len(c.users) == 1 and next(iter(c.users)).target == bn_name for c in calls[conv_name])
        if feeds_only_bn:
            pairs.append((conv_name, bn_name))
        else:
            kept.append(f"{bn_name} ({conv_name} is also used without it)")
    if kept:
        log.warning("BatchNorm kept unfolded, as folding would change the model: %s", ", ".join(kept))
    return pairs


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Folds BatchNorm into the preceding conv in place (eval statistics); returns the model."""
    model.eval()
    for conv_name, bn_name in conv_bn_pairs(model):
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        set_submodule(model, conv_name, fuse_conv_bn_eval(conv, bn, transpose=kind_of(conv).transposed))
        set_submodule(model, bn_name, nn.Identity())
    return model
