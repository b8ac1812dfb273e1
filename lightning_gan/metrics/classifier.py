"""The package's pretrained MNIST classifier: a small LeNet-style CNN whose penultimate features feed the sample
quality metrics (FID, KID, precision/recall) and whose logits give the classifier score."""

from __future__ import annotations

import hashlib
from importlib import resources

import torch
from torch import Tensor, nn

__all__ = ["WEIGHTS_FILE", "WEIGHTS_SHA256", "MNISTClassifier", "load_weights", "mnist_classifier"]

WEIGHTS_FILE = "mnist_classifier.pt"
# SHA-256 of the shipped weights, as `python -m lightning_gan.metrics.train_classifier` writes and prints them
WEIGHTS_SHA256 = "5392b93429bafb7a34f193746031814b74cc6bdc5a3e0866625073f023ccf594"
_MEAN, _STD = 0.1307, 0.3081  # MNIST's pixel mean and standard deviation on [0, 1]


class MNISTClassifier(nn.Module):
    """Two 5x5 conv + max-pool stages (20, 50 channels), a 128-unit hidden layer (the features), 10 logits.

    Takes images (N, 1, 28, 28) in [0, 1] (the MNIST configs' data space) of any float dtype.
    """

    num_features = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 20, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(800, self.num_features),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(self.num_features, 10)
        self.channels_last = False  # set by load_weights: NHWC convolutions, 1.7x faster on CPU (not in training)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (N, 128), float32."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(
                f"MNISTClassifier takes images (N, 1, 28, 28) in [0, 1], got shape {tuple(x.shape)}; "
                "reshape them with x.view(-1, 1, 28, 28)."
            )
        x = (x.float() - _MEAN) / _STD
        return self.body(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, 10)."""
        return self.head(self.dropout(self.features(x)))


class FeatureExtractor(nn.Module):
    """``classifier.features`` as a module's ``forward`` (what torchmetrics' ``feature=`` calls)."""

    def __init__(self, classifier: MNISTClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x)


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def load_weights(data: bytes, expected_sha256: str | None = WEIGHTS_SHA256) -> MNISTClassifier:
    """An eval-mode :class:`MNISTClassifier` from serialised weights, checked against ``expected_sha256``.

    Raises:
        ValueError: when the bytes' SHA-256 is not ``expected_sha256``.
    """
    if expected_sha256 is not None and sha256(data) != expected_sha256:
        raise ValueError(
            f"the MNIST classifier's weights have SHA-256 {sha256(data)}, expected {expected_sha256}: the file is "
            f"corrupt or was replaced; reinstall lightning-gan, or rebuild it with "
            "`python -m lightning_gan.metrics.train_classifier --mnist-root DIR --out PATH`."
        )
    import io

    model = MNISTClassifier()
    model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    model.channels_last = True
    return model.to(memory_format=torch.channels_last).eval().requires_grad_(False)


def mnist_classifier() -> MNISTClassifier:
    """The pretrained MNIST classifier shipped with the package (eval mode, no gradients): ``forward(x)`` logits
    (N, 10), ``features(x)`` (N, 128), for images (N, 1, 28, 28) in [0, 1]."""
    data = resources.files("lightning_gan.metrics").joinpath(WEIGHTS_FILE).read_bytes()
    return load_weights(data)
