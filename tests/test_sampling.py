"""lightning_gan.sampling: seeded noise outside the training stream, the generator to draw from, the datamodule's
images."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_nets

from lightning_gan.sampling import datamodule_images, sampling_generator, seeded_noise


def test_seeded_noise_is_the_seed_s_draw_and_leaves_the_global_random_state_as_it_was() -> None:
    generator, _ = tiny_nets()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    noise = seeded_noise(generator, 5, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)
    torch.testing.assert_close(noise, generator.sample_noise(5, torch.device("cpu")), rtol=0, atol=0)
    assert noise.device.type == "cpu" and not noise.requires_grad
    torch.testing.assert_close(seeded_noise(generator, 5, seed=7), noise, rtol=0, atol=0)  # the same every time


def test_sampling_generator_is_the_average_when_there_is_one() -> None:
    generator, average = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    assert sampling_generator(SimpleNamespace(generator=generator)) is generator
    assert sampling_generator(SimpleNamespace(generator=generator, sampling_generator=average)) is average


def test_datamodule_images_names_what_is_missing() -> None:
    images = torch.zeros(2, 1, 3, 3)
    datamodule = SimpleNamespace(splits=SimpleNamespace(val=SimpleNamespace(images=images)))
    assert datamodule_images(datamodule, "val", "SomeCallback") is images
    with pytest.raises(ValueError, match=r"SomeCallback needs the test images as `trainer\.datamodule\.splits\.test"):
        datamodule_images(datamodule, "test", "SomeCallback")
