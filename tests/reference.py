"""Plain-PyTorch formulas of the same math, the independent reference of the tests."""
import math

import torch
import torch.nn.functional as F

ZETA, GAMMA = 1.1, -0.1


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
    conv = F.conv2d if w.dim() == 4 else F.conv1d
    return conv(x, w, b, **geometry)


ACTIVATIONS = {"none": lambda x: x, "relu": F.relu, "relu6": F.relu6}


def adaround_loop(w, b, scale, zero_point, n, p, axis, inputs, targets, geometry, iterations, batch_size,
                  lr, reg_lambda, warm_start, activation, seed, record_losses=True):
    """The paper's minibatch AdaRound with autograd and torch.optim.Adam. Returns (V, losses).

    record_losses=False skips the per-iteration host sync (for timing on a GPU).
    """
    v = init_v(w, scale, axis).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    gen = torch.Generator(device=w.device).manual_seed(seed)
    act = ACTIVATIONS[activation]
    positions = targets[0, 0].numel()
    warm = int(warm_start * iterations)
    losses = []
    for t in range(iterations):
        idx = torch.randint(0, inputs.shape[0], (batch_size,), generator=gen, device=w.device)
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
