"""The shipped MNIST classifier: its interface, its weights' checked hash and size, its accuracy on real MNIST."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import tomllib
import torch

from lightning_gan import mnist_classifier
from lightning_gan.metrics.classifier import WEIGHTS_FILE, WEIGHTS_SHA256, load_weights, sha256
from lightning_gan.metrics.train_classifier import main as train_main
from lightning_gan.metrics.train_classifier import shift

ROOT = Path(__file__).resolve().parents[1]


def weights() -> bytes:
    return resources.files("lightning_gan.metrics").joinpath(WEIGHTS_FILE).read_bytes()


def test_the_classifier_is_an_eval_module_with_logits_and_features() -> None:
    net = mnist_classifier()
    assert isinstance(net, torch.nn.Module) and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    x = torch.rand(5, 1, 28, 28)
    assert net(x).shape == (5, 10)
    assert net.features(x).shape == (5, net.num_features) == (5, 128)
    torch.testing.assert_close(net.head(net.features(x)), net(x))  # the logits come from the features
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\).*x.view"):
        net.features(torch.rand(5, 784))


def test_the_weights_ship_as_package_data_checked_by_their_hash() -> None:
    data = weights()
    assert len(data) <= 2 * 2**20
    assert sha256(data) == WEIGHTS_SHA256
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert WEIGHTS_FILE in package_data["lightning_gan.metrics"]
    with pytest.raises(ValueError, match=r"SHA-256 .* expected .*train_classifier"):
        load_weights(data[:-1] + bytes([data[-1] ^ 1]))


def test_shift_moves_each_image_by_at_most_two_pixels() -> None:
    x = torch.zeros(50, 1, 28, 28)
    x[:, 0, 13, 14] = 1
    moved = shift(x, torch.Generator().manual_seed(0))
    where = torch.stack([m[0].nonzero()[0] for m in moved])  # each pixel kept, somewhere
    assert moved.sum() == 50
    assert (where - torch.tensor([13, 14])).abs().max() == 2 and len({tuple(w.tolist()) for w in where}) > 5


def test_the_training_script_refuses_a_folder_without_mnist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="MNIST not found"):
        train_main(["--mnist-root", str(tmp_path), "--out", str(tmp_path / "w.pt")])
    assert not (tmp_path / "w.pt").exists()


def test_the_classifier_reaches_99_percent_on_real_mnist_test(real_mnist_root: Path) -> None:
    from lightning_gan.datasets import load_mnist

    test = load_mnist(real_mnist_root, download=False).test
    net = mnist_classifier()
    with torch.no_grad():
        predicted = torch.cat([net(x).argmax(1) for x in test.images.split(2000)])
    assert (predicted == test.labels).float().mean() >= 0.99
