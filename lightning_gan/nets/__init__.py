"""The networks of Goodfellow et al. (2014): the MLP pair (:mod:`~lightning_gan.nets.mlp`), the convolutional
CIFAR-10 pair (:mod:`~lightning_gan.nets.conv`), and the blocks they share (:mod:`~lightning_gan.nets.layers`).

Every network that has weight constraints exposes ``apply_constraints()``, which :class:`~lightning_gan.GAN` calls
after each update of that network.
"""

from lightning_gan.nets.conv import ConvMaxoutDiscriminator, DeconvGenerator
from lightning_gan.nets.layers import Activation, Maxout, MaxoutConv2d, NoiseDistribution, eval_forward
from lightning_gan.nets.mlp import MaxoutDiscriminator, MLPGenerator

__all__ = [
    "Activation",
    "ConvMaxoutDiscriminator",
    "DeconvGenerator",
    "MLPGenerator",
    "Maxout",
    "MaxoutConv2d",
    "MaxoutDiscriminator",
    "NoiseDistribution",
    "eval_forward",
]
