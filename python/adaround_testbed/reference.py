"""Plain-PyTorch formulas of the same math, the independent reference of the tests."""
import math

import torch
import torch.nn.functional as F

ZETA, GAMMA = 1.1, -0.1
# |V| from which h(V) is exactly 0 or 1 (ln 11, plus a margin for float rounding).
SATURATED_V = math.log(11) + 1e-3


def h(v):
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def broadcast(t, weight, axis):
    if axis is None:
        return t.reshape(())
    shape = [1] * weight.dim()
    shape[axis] = -1
    return t.reshape(shape)


def soft_quantize(w, v, scale, zero_point, n, p, axis):
    s = broadcast(scale, w, axis).to(v.dtype)
    z = broadcast(zero_point, w, axis).to(v.dtype) if zero_point is not None else torch.zeros((), dtype=v.dtype)
    return s * (torch.clamp(torch.floor(w.to(v.dtype) / s) + h(v) + z, n, p) - z)


def regularizer(v, beta):
    return (1 - (2 * h(v) - 1).abs().pow(beta)).sum()


def init_v(w, scale, axis):
    x = w / broadcast(scale, w, axis)
    frac = x - torch.floor(x)
    p = (frac - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1 - p))


def hard_quantize(w, scale, zero_point, n, p, axis, mode, v=None, noise=None):
    s = broadcast(scale, w, axis)
    z = broadcast(zero_point, w, axis) if zero_point is not None else torch.zeros(())
    x = w / s
    rounded = {
        "nearest": lambda: torch.round(x),
        "floor": lambda: torch.floor(x),
        "ceil": lambda: torch.ceil(x),
        "stochastic": lambda: torch.floor(x) + (noise < x - torch.floor(x)).to(x.dtype),
        "adaptive": lambda: torch.floor(x) + (h(v) >= 0.5).to(x.dtype),
    }[mode]()
    code = torch.clamp(rounded + z, n, p)
    return code, s * (code - z)


def beta_at(t, iterations, warm_start=0.2, beta_start=20.0, beta_end=2.0, schedule="cosine"):
    warm_end = warm_start * iterations
    progress = min(max((t - warm_end) / max(1.0, iterations - warm_end), 0.0), 1.0)
    if schedule == "linear":
        return beta_start + (beta_end - beta_start) * progress
    return beta_end + 0.5 * (beta_start - beta_end) * (1 + math.cos(math.pi * progress))


def layer_forward(x, w, b, geometry):
    if w.dim() == 2:
        return F.linear(x, w, b)
    geometry = dict(geometry)
    if geometry.pop("transposed", False):
        conv = F.conv_transpose2d if w.dim() == 4 else F.conv_transpose1d
        return conv(x, w, b, geometry["stride"], geometry["padding"], geometry.get("output_padding", 0),
                    geometry["groups"], geometry["dilation"])
    conv = F.conv2d if w.dim() == 4 else F.conv1d
    return conv(x, w, b, **geometry)


ACTIVATIONS = {"none": lambda x: x, "relu": F.relu, "relu6": F.relu6}


def dead_weights(x, w, geometry):
    """Mask shaped like the Conv2d weight `w` (groups 1): the weights that see zero input in every
    sample and output position of `x`, i.e. only padding or inputs that are always zero."""
    cols = F.unfold(x, w.shape[2:], dilation=geometry["dilation"], padding=geometry["padding"],
                    stride=geometry["stride"])  # [n, Cin*kh*kw, L]
    live = (cols != 0).any(dim=2).any(dim=0)
    return (~live).expand(w.shape[0], -1).reshape(w.shape)


def decided_nearest(v, mask):
    """V with the entries under `mask` saturated on the side nearest rounding takes (h(V) >= 1/2: up)."""
    side = torch.full_like(v, SATURATED_V)
    return torch.where(mask, torch.where(v >= 0, side, -side), v)


# optimize_layer's minibatch convention: the rows come from a CPU generator seeded with `seed` on
# every device, ROW_CHUNK iterations at a time (the same sequence as one draw per iteration; on a GPU
# the chunk is copied over and lives in device memory).
ROW_CHUNK = 1024


def adaround_loop(w, b, scale, zero_point, n, p, axis, inputs, targets, geometry, iterations, batch_size,
                  lr, reg_lambda, warm_start, activation, seed, record_losses=True, v_init=None):
    """The paper's minibatch AdaRound with autograd and torch.optim.Adam. Returns (V, losses).

    record_losses=False skips the per-iteration host sync (for timing on a GPU); v_init replaces the
    initial V.
    """
    v = (init_v(w, scale, axis) if v_init is None else v_init).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    act = ACTIVATIONS[activation]
    positions = targets[0, 0].numel()
    warm = int(warm_start * iterations)
    losses = []
    for t in range(iterations):
        if t % ROW_CHUNK == 0:
            rows = torch.randint(0, inputs.shape[0], (ROW_CHUNK, batch_size), generator=gen).to(inputs.device)
        idx = rows[t % ROW_CHUNK]
        x, y = inputs[idx], targets[idx]
        pre = layer_forward(x, soft_quantize(w, v, scale, zero_point, n, p, axis), b, geometry)
        loss = (act(pre) - y).pow(2).sum() / (batch_size * positions)
        if t >= warm:
            loss = loss + reg_lambda * regularizer(v, beta_at(t, iterations, warm_start))
        if record_losses:
            losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return v.detach(), torch.tensor(losses)
