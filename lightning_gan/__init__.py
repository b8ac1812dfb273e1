"""lightning-gan: the original Generative Adversarial Nets (Goodfellow et al., 2014) as a Lightning plug-in."""

from lightning_gan.callbacks import MatmulPrecision, ParzenEvaluation
from lightning_gan.compiling import CompileNetworks
from lightning_gan.data import GANDataModule
from lightning_gan.figures import LatentInterpolation, SampleGrid
from lightning_gan.metrics import mnist_classifier
from lightning_gan.module import GAN
from lightning_gan.monitor import CollapseMonitor, GANProgressBar
from lightning_gan.nets import (
    ConvMaxoutDiscriminator,
    DeconvGenerator,
    Maxout,
    MaxoutConv2d,
    MaxoutDiscriminator,
    MLPGenerator,
)
from lightning_gan.parzen import ParzenLogLikelihood, parzen_log_likelihood, select_sigma
from lightning_gan.quality import SampleQuality
from lightning_gan.schedules import ExponentialDecay, MomentumRamp

__version__ = "0.1.0"

__all__ = [
    "GAN",
    "CollapseMonitor",
    "CompileNetworks",
    "ConvMaxoutDiscriminator",
    "DeconvGenerator",
    "ExponentialDecay",
    "GANDataModule",
    "GANProgressBar",
    "LatentInterpolation",
    "MLPGenerator",
    "MatmulPrecision",
    "Maxout",
    "MaxoutConv2d",
    "MaxoutDiscriminator",
    "MomentumRamp",
    "ParzenEvaluation",
    "ParzenLogLikelihood",
    "SampleGrid",
    "SampleQuality",
    "__version__",
    "mnist_classifier",
    "parzen_log_likelihood",
    "select_sigma",
]
