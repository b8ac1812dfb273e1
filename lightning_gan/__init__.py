"""lightning-gan: the original Generative Adversarial Nets (Goodfellow et al., 2014) as a Lightning plug-in."""

from lightning_gan.conv_nets import ConvMaxoutDiscriminator, DeconvGenerator, MaxoutConv2d
from lightning_gan.data import GANDataModule
from lightning_gan.module import GAN
from lightning_gan.nets import Maxout, MaxoutDiscriminator, MLPGenerator
from lightning_gan.schedules import ExponentialDecay, MomentumRamp

__version__ = "0.1.0"

__all__ = [
    "GAN",
    "ConvMaxoutDiscriminator",
    "DeconvGenerator",
    "ExponentialDecay",
    "GANDataModule",
    "MLPGenerator",
    "Maxout",
    "MaxoutConv2d",
    "MaxoutDiscriminator",
    "MomentumRamp",
    "__version__",
]
