"""Sample-quality metrics: the package's MNIST classifier and improved precision/recall on its features."""

from lightning_gan.metrics.classifier import MNISTClassifier, mnist_classifier
from lightning_gan.metrics.precision_recall import PrecisionRecall, knn_radii, precision_recall

__all__ = ["MNISTClassifier", "PrecisionRecall", "knn_radii", "mnist_classifier", "precision_recall"]
