"""Trains torchvision resnet18(num_classes=10) on Debian's Fashion-MNIST with the testbed recipe
(docs/design.md#testbed) and saves the checkpoint (reused when present).

    .venv/bin/python examples/train_fashion_mnist.py [--out runs/fashion_mnist_resnet18.pt] [--epochs 3]
"""
import argparse
import os

import torch

from adaround_testbed import testbed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/fashion_mnist_resnet18.pt")
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    model = testbed.network("resnet18", 10)
    if os.path.exists(args.out):
        model.load_state_dict(torch.load(args.out, map_location="cpu", weights_only=True))
        print(f"reusing {args.out}")
    else:
        images, labels = testbed.fashion_mnist("train")
        testbed.train(model, images, labels, epochs=args.epochs)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        torch.save(model.state_dict(), args.out)
        print(f"saved {args.out}")
    test_x, test_y = testbed.fashion_mnist("test")
    print(f"test accuracy: {testbed.evaluate(model, test_x, test_y):.2f}%")


if __name__ == "__main__":
    main()
