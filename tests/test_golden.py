"""Fixed-seed CPU training gives the same weights, bit for bit, as the release these hashes were recorded on.

The hashes were recorded on lightning-gan 0.1.0 (commit 0d93fc0) before its core was rebuilt, on x86-64 CPUs with
torch 2.14.1, one thread, once for each CPU kernel set (AVX2, AVX512), which round some scenarios differently. Every
parameter and buffer of the trained module is hashed, the generator's weight average included, and the optimizers'
state. On another kernel set the test is skipped, naming the kernels it needs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import quiet_trainer, tiny_nets
from lightning.pytorch import seed_everything

from lightning_gan import (
    GAN,
    ConvMaxoutDiscriminator,
    DeconvGenerator,
    GANDataModule,
    MaxoutDiscriminator,
    MLPGenerator,
)
from lightning_gan.datasets import Split, Splits

EXPECTED = {  # per CPU kernel set (torch.backends.cpu.get_cpu_capability()), each recorded on 0.1.0
    "AVX2": {
        "adam_average_stacked": "83fa1e99bf8be50483fcd9f5fd913fe3acb28e6cda34bdc866a5c2d92552169a",
        "alternating_k2": "43a26b71e002b95814846cf35949d7d6900e9dc9763e54eaea862eacdfd62d10",
        "constrained_nets": "a7883ef5496d612d203e6fd4e276c3966d640c89b4995ddef8eaa7f4a5a1a42d",
        "conv_nets": "c4e31305c51db8c8ada2960cf0b4ecb10e4c2bf19d8c4efadd54bd058dfda7d7",
        "simultaneous": "3668fe1bb8de27fac7abcaecad4efb5d1a5045588ac74a6b1ef7a05409637823",
        # several steps per batch run the same updates as one batch per step
        "steps_per_batch": "43a26b71e002b95814846cf35949d7d6900e9dc9763e54eaea862eacdfd62d10",
        "weight_average": "189c5ddb748febe3818386d0ff9a4d0972e1da08de4936f757f28a53754034cd",
    },
    "AVX512": {
        "adam_average_stacked": "13f3aecd54ba19142f0c69a1638e936fbb7191006d592bab8895d85cbcf6347b",
        "alternating_k2": "43a26b71e002b95814846cf35949d7d6900e9dc9763e54eaea862eacdfd62d10",
        "constrained_nets": "3c4c33f0fede744309152b4009125889f0925b644aefdf2d6ac2a71d223dee64",
        "conv_nets": "cfc8e841d4a98f4f7f28f62ce2720399b8ddac89b6c27d98c8e39070d10d4098",
        "simultaneous": "3668fe1bb8de27fac7abcaecad4efb5d1a5045588ac74a6b1ef7a05409637823",
        "steps_per_batch": "43a26b71e002b95814846cf35949d7d6900e9dc9763e54eaea862eacdfd62d10",
        "weight_average": "189c5ddb748febe3818386d0ff9a4d0972e1da08de4936f757f28a53754034cd",
    },
}


class TinyImages(GANDataModule):
    """48 training images ``shape``, 8 for validation and 8 for test: a few steps per epoch."""

    def __init__(self, shape: tuple[int, ...] = (1, 2, 2), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shape = shape

    def load_splits(self) -> Splits:
        images = torch.rand(64, *self.shape, generator=torch.Generator().manual_seed(0))
        labels = torch.zeros(64, dtype=torch.long)
        return Splits(
            Split(images[:48], labels[:48]), Split(images[48:56], labels[48:56]), Split(images[56:], labels[56:])
        )


def constrained_nets() -> tuple[MLPGenerator, MaxoutDiscriminator]:
    generator = MLPGenerator(
        noise_dim=4, hidden_sizes=(8, 8), hidden_activations=("relu", "sigmoid"), out_shape=(1, 2, 2), max_col_norm=0.5
    )
    return generator, MaxoutDiscriminator(in_shape=(1, 2, 2), units=(6, 4), pieces=(2, 3), max_col_norm=0.5)


def conv_nets() -> tuple[DeconvGenerator, ConvMaxoutDiscriminator]:
    generator = DeconvGenerator(
        noise_dim=4, hidden_sizes=(8, 18), base_shape=(2, 3, 3), out_channels=1, kernel_size=2, stride=1,
        output_activation="sigmoid", output_bias_from_data=True, max_col_norm=0.5, max_kernel_norm=0.5,
    )  # fmt: skip
    discriminator = ConvMaxoutDiscriminator(
        in_shape=(1, 4, 4), channels=(2,), kernel_sizes=(3,), paddings=(1,), pool_sizes=(2,), pool_strides=(2,),
        units=(3,), unit_pieces=2, max_kernel_norm=0.5, max_col_norm=0.5,
    )  # fmt: skip
    return generator, discriminator


SCENARIOS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # (GAN arguments, datamodule arguments)
    "alternating_k2": ({"k": 2, "momentum_saturate_epoch": 3}, {}),
    "simultaneous": ({"schedule": "simultaneous", "momentum_saturate_epoch": 3}, {}),
    "weight_average": ({"k": 1, "ema_decay": 0.9, "lr_decay": 1.01}, {}),
    "steps_per_batch": ({"k": 2, "momentum_saturate_epoch": 3}, {"steps_per_batch": 3}),
    "adam_average_stacked": (
        {
            "generator_optimizer": lambda params: torch.optim.Adam(params, lr=2e-3, betas=(0.5, 0.999)),
            "discriminator_optimizer": lambda params: torch.optim.Adam(params, lr=2e-3, betas=(0.5, 0.999)),
            "momentum_final": None,
            "lr_decay": 1.0,
            "ema_decay": 0.8,
        },
        {"steps_per_batch": 2},
    ),
    "constrained_nets": ({"nets": constrained_nets, "k": 2}, {}),
    "conv_nets": ({"nets": conv_nets, "schedule": "simultaneous"}, {"shape": (1, 4, 4)}),
}


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digest(gan: GAN, optimizers: list[torch.optim.Optimizer]) -> str:
    """SHA-256 of every tensor of the module's state dict and of the optimizers' state, in order."""
    sha = hashlib.sha256()
    for name, tensor in gan.state_dict().items():
        sha.update(name.encode())
        sha.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for key, value in sorted(state.items()):
                sha.update(key.encode())
                sha.update(torch.as_tensor(value).detach().cpu().numpy().tobytes())
    return sha.hexdigest()


def train(name: str) -> str:
    gan_args, data_args = dict(SCENARIOS[name][0]), SCENARIOS[name][1]
    seed_everything(0, verbose=False)
    gan = GAN(*gan_args.pop("nets", tiny_nets)(), **gan_args)
    trainer = quiet_trainer(max_epochs=3, log_every_n_steps=6, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(gan, TinyImages(batch_size=4, **data_args))
    optimizers = [getattr(optimizer, "optimizer", optimizer) for optimizer in trainer.optimizers]
    return digest(gan, optimizers)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_training_is_bit_for_bit_the_recorded_one(name: str) -> None:
    kernels = torch.backends.cpu.get_cpu_capability()
    if kernels not in EXPECTED:
        pytest.skip(f"hashes recorded with torch's {' and '.join(EXPECTED)} CPU kernels, this CPU runs {kernels}")
    assert train(name) == EXPECTED[kernels][name]
