"""The Fashion-MNIST testbed (docs/design.md#testbed): data, training of resnet18(num_classes=10), evaluation.
ImageNet (ImageFolder val layout) for users who have it locally."""
from __future__ import annotations

import gzip
import os
import time
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FASHION_MNIST_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str = "train", root: Optional[str] = None):
    """(images [N, 3, 32, 32] normalised, labels [N]) from Debian's dataset-fashion-mnist files."""
    root = root or FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    if not os.path.exists(images_path):
        raise FileNotFoundError(f"{images_path} not found: install Debian's dataset-fashion-mnist "
                                f"(scripts/bootstrap.sh does) or set FASHION_MNIST_DIR")
    images = torch.from_numpy(_read_idx(images_path).copy()).float().div_(255)
    labels = torch.from_numpy(_read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")).copy()).long()
    images = F.pad(images, (2, 2, 2, 2))  # 28 -> 32
    images = ((images - MEAN) / STD).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return images, labels


ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")


def network(arch: str = "resnet18", num_classes: int = 10) -> nn.Module:
    import torchvision

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    return getattr(torchvision.models, arch)(num_classes=num_classes)


def load_network(arch: str, path: str) -> nn.Module:
    """The 10-class testbed network `arch` with the FP32 weights saved at `path`, in eval mode."""
    model = network(arch, 10)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def calibration_and_test(samples: int, test_images: Optional[int] = None):
    """(calibration images, (test images, labels)): a fixed random subset of `samples` training images
    (seed 0, labels unused) and the first `test_images` test images (all when None)."""
    train_x, _ = fashion_mnist("train")
    calib = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:samples]]
    test_x, test_y = fashion_mnist("test")
    return calib, (test_x[:test_images], test_y[:test_images])


def train(model: nn.Module, images, labels, epochs: int = 3, batch_size: int = 128, max_lr: float = 0.1,
          weight_decay: float = 5e-4, seed: int = 0, log=print) -> nn.Module:
    """SGD with nesterov momentum, OneCycle schedule, random horizontal flips (docs/design.md#testbed). Trains
    where the model's parameters are (the images may stay on the CPU)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=max_lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        start, total, correct = time.perf_counter(), 0, 0
        for idx in torch.randperm(len(images), generator=gen).split(batch_size):
            x, y = images[idx], labels[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x).to(device)
            y = y.to(device)
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += len(idx)
            correct += (out.argmax(1) == y).sum().item()
        log(f"epoch {epoch + 1}/{epochs}: train accuracy {correct / total:.2%} ({time.perf_counter() - start:.0f} s)")
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, images, labels=None, batch_size: int = 500, device=None) -> float:
    """Top-1 accuracy in percent over tensors (images, labels), or, with labels None, over an
    iterable of (images, labels) batches such as a DataLoader (ImageNet's val set does not fit in memory)."""
    if device is None:
        tensor = next(iter(model.parameters()), None)
        tensor = tensor if tensor is not None else next(iter(model.buffers()), None)
        device = tensor.device if tensor is not None else "cpu"
    batches = images if labels is None else zip(images.split(batch_size), labels.split(batch_size))
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    if total == 0:
        raise ValueError("evaluate: no test images")
    return 100.0 * correct / total


def imagenet_subset(path: str, limit: Optional[int] = None):
    """An ImageNet-style folder (ImageFolder layout) resized to 256 and centre-cropped to 224, as
    torchvision's pretrained weights expect; with `limit`, a fixed random spread over its classes."""
    import torchvision
    from torchvision import transforms as T

    if not os.path.isdir(path):
        raise FileNotFoundError(f"ImageNet directory {path!r} not found")
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    dataset = torchvision.datasets.ImageFolder(path, tf)
    if limit is None or limit >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
    return torch.utils.data.Subset(dataset, idx.tolist())


def imagenet_loader(path: str, limit: Optional[int] = None, batch_size: int = 100, workers: int = 4):
    """Batches of (images, labels) from imagenet_subset, decoded by `workers` processes."""
    return torch.utils.data.DataLoader(imagenet_subset(path, limit), batch_size=batch_size, num_workers=workers)


def imagenet_images(path: str, limit: int, workers: int = 4) -> torch.Tensor:
    """The images of imagenet_subset(path, limit) in one tensor (calibration sets of ~1k images)."""
    return torch.cat([x for x, _ in imagenet_loader(path, limit, workers=workers)])
