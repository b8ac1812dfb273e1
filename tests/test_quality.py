"""SampleQuality and the precision/recall it computes: sanity on real MNIST features, the callback's logs and printed
line, its place outside the checkpoint, and the same values on 2 DDP ranks as on 1 process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REAL_DATA_ROOT, quiet_trainer
from lightning.pytorch import Callback
from test_reliability import time_limit
from torchmetrics.image.fid import FrechetInceptionDistance

from lightning_gan import GAN, GANDataModule, MaxoutDiscriminator, MLPGenerator, SampleQuality, mnist_classifier
from lightning_gan.datasets import Split, Splits, load_mnist
from lightning_gan.guards import NonFiniteError
from lightning_gan.metrics import knn_radii, precision_recall

KEYS = ["fid", "kid_mean", "kid_std", "precision", "recall", "classifier_score"]


# ---------------------------------------------------------------------------------------------- real MNIST sanity
@pytest.fixture(scope="module")
def real() -> dict[str, torch.Tensor]:
    """Classifier features (N, 128) of real MNIST sets and of altered copies, computed once for the module."""
    if not (REAL_DATA_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real MNIST not found under {REAL_DATA_ROOT} (set LIGHTNING_GAN_DATA_ROOT)")
    splits = load_mnist(REAL_DATA_ROOT, download=False)
    train, labels = splits.train.images[:10000], splits.train.labels[:10000]
    noise = torch.randn(3000, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    sets = {
        "test": splits.test.images,
        "train": train,
        "noisy_0.1": (train[:3000] + 0.1 * noise).clamp(0, 1),
        "noisy_0.3": (train[:3000] + 0.3 * noise).clamp(0, 1),
        "five_classes": splits.train.images[splits.train.labels < 5][:5000],
        "superposed": (train[:5000] + train[5000:]) / 2,
    }
    assert labels[:5000].unique().numel() == 10
    net = mnist_classifier()
    with torch.no_grad():
        features = {name: torch.cat([net.features(x) for x in images.split(2500)]) for name, images in sets.items()}
    return {**features, "train_5k": features["train"][:5000]}


def unit(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features, dim=1)  # as PrecisionRecall(normalize=True), the callback's


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    metric = FrechetInceptionDistance(feature=torch.nn.Identity(), input_img_size=(128,), normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


@pytest.fixture(scope="module")
def test_radii(real: dict[str, torch.Tensor]) -> torch.Tensor:
    return knn_radii(unit(real["test"]), 3)


def pr(real: dict[str, torch.Tensor], radii: torch.Tensor, fake: str) -> tuple[float, float]:
    return precision_recall(unit(real["test"]), unit(real[fake]), real_radii=radii)


def test_fid_of_real_train_against_test_is_small_and_grows_with_noise(real: dict[str, torch.Tensor]) -> None:
    floor = fid(real["test"], real["train"])
    assert floor < 5
    noisy = [fid(real["test"], real[f"noisy_{s}"]) for s in ("0.1", "0.3")]
    assert 5 * floor < noisy[0] < noisy[1]


def test_dropping_five_classes_keeps_precision_and_loses_recall(real, test_radii) -> None:
    (p_real, r_real), (p_five, r_five) = pr(real, test_radii, "train_5k"), pr(real, test_radii, "five_classes")
    assert p_five > 0.8 and p_five > p_real - 0.05
    assert r_five < 0.6 < r_real and r_five < r_real - 0.25


def test_superposed_digits_lose_precision(real, test_radii) -> None:
    (p_real, _), (p_super, _) = pr(real, test_radii, "train_5k"), pr(real, test_radii, "superposed")
    assert p_real > 0.8 and p_super < p_real - 0.3


def test_knn_radii_are_the_k_th_neighbour_s_squared_distance() -> None:
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    d2 = torch.cdist(x.double(), x.double()).square()
    expected = d2.sort(1).values[:, 3]  # column 0 is the point itself
    torch.testing.assert_close(knn_radii(x, 3).double(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="k=0"):
        knn_radii(x, 0)


def test_precision_and_recall_count_the_points_inside_the_other_side_s_balls() -> None:
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0]])  # radii (k=1): 1, 1, 1, 64
    fake = torch.tensor([[0.5], [30.0]])  # radii (k=1): 870.25 each
    p, r = precision_recall(real, fake, k=1)
    assert p == 0.5  # 0.5 is within 1 of 0 and 1; 30 is outside every ball (10's reaches 18)
    assert r == 1.0  # every real point is within sqrt(870.25) = 29.5 of 0.5


# ---------------------------------------------------------------------------------------------- the callback
class Small(GANDataModule):
    """Random (1, 28, 28) images as train / val / test splits."""

    def load_splits(self) -> Splits:
        g = torch.Generator().manual_seed(0)
        images = torch.rand(2200, 1, 28, 28, generator=g) ** 3
        labels = torch.zeros(2200, dtype=torch.long)
        return Splits(Split(images[:200], labels[:200]), Split(images[200:1200], labels[200:1200]),
                      Split(images[1200:], labels[1200:]))  # fmt: skip


def tiny_gan() -> GAN:
    generator = MLPGenerator(noise_dim=4, hidden_sizes=(8,), hidden_activations=("relu",), out_shape=(1, 28, 28))
    discriminator = MaxoutDiscriminator(in_shape=(1, 28, 28), units=(6,), pieces=2)
    torch.manual_seed(0)
    return GAN(generator, discriminator)


def quality() -> SampleQuality:
    return SampleQuality(num_samples=1000, kid_subsets=10, kid_subset_size=200, chunk_size=300)


class SaveResults(Callback):
    """Each rank writes the quality callback's results, for the parent process to compare."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_validation_epoch_end(self, trainer, pl_module) -> None:  # after SampleQuality's (callback order)
        (quality_cb,) = [c for c in trainer.callbacks if isinstance(c, SampleQuality)]
        path = self.folder / f"rank{trainer.global_rank}_of_{trainer.world_size}.json"
        path.write_text(json.dumps(quality_cb.results))


def test_the_callback_logs_every_value_prints_a_line_and_leaves_the_random_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gan, callback = tiny_gan(), quality()
    trainer = quiet_trainer(
        max_steps=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0, callbacks=[callback],
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(gan, datamodule=Small(batch_size=100))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("quality/")}
    assert sorted(logged) == sorted(f"quality/{k}" for k in KEYS)
    assert logged["quality/fid"] > 0 and 0 <= logged["quality/precision"] <= 1 and 0 <= logged["quality/recall"] <= 1
    assert 1 <= logged["quality/classifier_score"] <= 10
    # the classifier is no child of the GAN, and nothing of it is in the checkpoint
    (ckpt,) = tmp_path.rglob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert not [k for k in state["state_dict"] if "classifier" in k or "head" in k or "body" in k]
    assert all(s == {} for key, s in state["callbacks"].items() if "SampleQuality" in key)
    assert not [v for v in state["state_dict"].values() if v.shape == callback.classifier.head.weight.shape]
    # the real statistics are kept; a second evaluation gives the same values and leaves the global random state
    rng = torch.random.get_rng_state()
    again = callback.evaluate(trainer, gan, "val")
    assert torch.equal(rng, torch.random.get_rng_state())
    for key, value in again.items():
        assert value == pytest.approx(logged[key], rel=1e-5), key
    trainer.test(gan, datamodule=Small(batch_size=100))
    out = capsys.readouterr().out
    r = callback.results
    line = f"Sample quality (Small test, MNIST classifier features): FID {r['quality/fid']:.2f}, KID "
    line += f"{r['quality/kid_mean']:.4f} ± {r['quality/kid_std']:.4f}, precision {r['quality/precision']:.3f}"
    assert line in out
    assert "1000 samples, 1000 examples" in out and r != again  # the test split, not validation


def test_images_the_default_classifier_cannot_read_are_refused_before_training() -> None:
    class Colour(Small):
        def load_splits(self) -> Splits:
            s = torch.rand(1000, 3, 8, 8)
            return Splits(*(Split(s, torch.zeros(1000, dtype=torch.long)),) * 3)

    with pytest.raises(ValueError, match=r"MNIST classifier.*\(3, 8, 8\).*feature="):
        quiet_trainer(max_steps=1, callbacks=[quality()]).fit(tiny_gan(), datamodule=Colour())
    with pytest.raises(ValueError, match="kid_subset_size"):
        SampleQuality(num_samples=100)


def test_a_split_smaller_than_kid_s_subsets_is_refused_whatever_the_reference_size() -> None:
    callback = SampleQuality(num_samples=1000, kid_subset_size=500, reference_size=5000)
    with pytest.raises(ValueError, match=r"the val split has 200 images, fewer than kid_subset_size=500"):
        quiet_trainer(max_steps=1, callbacks=[callback]).fit(tiny_gan(), datamodule=Tiny(batch_size=100))


class Tiny(Small):
    def load_splits(self) -> Splits:
        splits = super().load_splits()
        return Splits(splits.val, splits.train, splits.test)  # a validation split of 200 images


def test_a_diverged_generator_gets_advice_about_the_generator() -> None:
    gan = tiny_gan()
    with torch.no_grad():
        gan.generator.output_layer.bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"samples for SampleQuality hold 1000 NaN/Inf values \(global step 0\)"):
        quiet_trainer(callbacks=[quality()]).validate(gan, datamodule=Small(batch_size=100), verbose=False)


def test_a_custom_feature_module_without_num_features_is_used() -> None:
    trainer = quiet_trainer(max_steps=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                            enable_checkpointing=False,
                            callbacks=[SampleQuality(num_samples=1000, kid_subsets=5, kid_subset_size=200,
                                                     feature=torch.nn.Sequential(torch.nn.Flatten(),
                                                                                 torch.nn.AvgPool1d(49)))])  # fmt: skip
    trainer.fit(tiny_gan(), datamodule=Small(batch_size=100))
    assert "quality/fid" in trainer.callback_metrics and "quality/classifier_score" not in trainer.callback_metrics


def test_two_ddp_ranks_give_the_one_process_values(tmp_path: Path) -> None:
    for devices, strategy in ((1, "auto"), (2, "ddp_fork_find_unused_parameters_true")):
        trainer = quiet_trainer(devices=devices, strategy=strategy, limit_val_batches=1, enable_checkpointing=False,
                                callbacks=[quality(), SaveResults(tmp_path)])  # fmt: skip
        with time_limit(120):  # fail rather than hang
            trainer.validate(tiny_gan(), datamodule=Small(batch_size=100))
    one = json.loads((tmp_path / "rank0_of_1.json").read_text())
    assert sorted(one) == sorted(f"quality/{k}" for k in KEYS)
    for rank in (0, 1):
        two = json.loads((tmp_path / f"rank{rank}_of_2.json").read_text())
        for key, value in one.items():
            assert two[key] == pytest.approx(value, rel=1e-4), (rank, key)
