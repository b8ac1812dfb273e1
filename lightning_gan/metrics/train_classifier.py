"""Retrain the shipped MNIST classifier, reproducibly on a CPU (seeded, single-threaded, deterministic).

    python -m lightning_gan.metrics.train_classifier --mnist-root DIR --out PATH

``DIR`` holds ``MNIST/raw/`` with the four IDX files. Trains on the 50,000-image train split with a fixed recipe
(nothing is selected on validation or test), prints the validation and test accuracy and the SHA-256 of ``PATH``.
"""

from __future__ import annotations

import argparse
import io
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gan.datasets import load_mnist
from lightning_gan.metrics.classifier import MNISTClassifier, sha256

EPOCHS, BATCH, LR, SEED, SHIFT = 8, 128, 2e-3, 0, 2


def shift(images: Tensor, gen: torch.Generator) -> Tensor:
    """Each image moved by a random whole-pixel offset in [-SHIFT, SHIFT]^2 (zero-filled)."""
    n = images.shape[0]
    padded = F.pad(images, (SHIFT,) * 4)
    dy, dx = (torch.randint(0, 2 * SHIFT + 1, (n,), generator=gen) for _ in range(2))
    rows = (dy[:, None] + torch.arange(28))[:, None, :, None].expand(n, 1, 28, 28 + 2 * SHIFT)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(28))[:, None, None, :].expand(n, 1, 28, 28)
    return out.gather(3, cols)


@torch.no_grad()
def accuracy(model: MNISTClassifier, images: Tensor, labels: Tensor) -> float:
    model.eval()
    batches = zip(images.split(1000), labels.split(1000), strict=True)
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / len(labels)


def train(mnist_root: str | Path) -> tuple[MNISTClassifier, bytes]:
    """Train the classifier; return it and its serialised weights (the bytes that ship)."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    splits = load_mnist(mnist_root, download=False)
    images, labels = splits.train.images, splits.train.labels
    model = MNISTClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    steps = EPOCHS * math.ceil(len(labels) / BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(EPOCHS):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(labels), generator=gen)
        for idx in order.split(BATCH):
            loss = F.cross_entropy(model(shift(images[idx], gen)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        val = accuracy(model, splits.val.images, splits.val.labels)
        seconds = time.perf_counter() - start
        print(f"epoch {epoch + 1}/{EPOCHS}: loss {float(loss.detach()):.4f}, val acc {val:.4f}, {seconds:.0f} s")
    buffer = io.BytesIO()  # a buffer, not the path: the zip's record names never depend on the file name
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, buffer)
    test = accuracy(model, splits.test.images, splits.test.labels)
    print(f"test accuracy {test:.4f}")
    return model.eval(), buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist-root", required=True, help="folder holding MNIST/raw/ with the four IDX files")
    parser.add_argument("--out", required=True, help="where to write the weights")
    args = parser.parse_args(argv)
    _, data = train(args.mnist_root)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")  # nothing half-written at `out`
    tmp.write_bytes(data)
    tmp.replace(out)
    print(f"wrote {out} ({len(data)} bytes), sha256 {sha256(data)}")


if __name__ == "__main__":
    main()
