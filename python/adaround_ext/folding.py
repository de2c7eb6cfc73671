"""BatchNorm folding: each BatchNorm that directly follows a conv is folded into it (and replaced
by nn.Identity), keeping the module tree of the model so that names stay the same."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .modules import set_submodule

_CONVS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)




def conv_bn_pairs(model: nn.Module):
    """(conv name, bn name) for every BatchNorm whose only input is a conv used only by it."""
    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BNS):
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules.get(src.target), _CONVS)
                and len(src.users) == 1):
            pairs.append((src.target, node.target))
    return pairs


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Folds BatchNorm into the preceding conv in place (eval statistics); returns the model."""
    model.eval()
    for conv_name, bn_name in conv_bn_pairs(model):
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
        set_submodule(model, conv_name, fuse_conv_bn_eval(conv, bn, transpose=transposed))
        set_submodule(model, bn_name, nn.Identity())
    return model
