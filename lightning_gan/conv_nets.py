"""The convolutional CIFAR-10 pair's former home, kept so that YAML ``class_path: lightning_gan.conv_nets.X`` and old
imports keep working; the networks live in :mod:`lightning_gan.nets`. Nothing in the package imports this module."""

from lightning_gan.nets import ConvMaxoutDiscriminator, DeconvGenerator, MaxoutConv2d

__all__ = ["ConvMaxoutDiscriminator", "DeconvGenerator", "MaxoutConv2d"]
