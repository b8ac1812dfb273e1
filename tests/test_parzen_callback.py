"""ParzenEvaluation: the paper's protocol through Lightning, exact on 1 process and on 2 DDP ranks."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_gan import GAN, GANDataModule, MaxoutDiscriminator, MLPGenerator, ParzenEvaluation
from lightning_gan.datasets import Split, Splits
from lightning_gan.guards import NonFiniteError
from lightning_gan.parzen import parzen_log_likelihood

TEST_SIZE = 101  # odd: a DistributedSampler would pad it with a repeated example on 2 ranks


def seeded_gan() -> GAN:
    torch.manual_seed(0)
    generator = MLPGenerator(noise_dim=8, hidden_sizes=(32,), hidden_activations=("relu",), init_range=0.5)
    return GAN(generator, MaxoutDiscriminator(units=(8,), pieces=2))


def evaluation() -> ParzenEvaluation:
    return ParzenEvaluation(num_samples=700, val_size=60, test_size=TEST_SIZE, chunk_size=100)


def run_test(mnist_root: Path, devices: int) -> tuple[dict[str, float], dict[str, float]]:
    trainer = quiet_trainer(
        devices=devices,
        strategy="ddp_fork_find_unused_parameters_true" if devices > 1 else "auto",
        callbacks=[evaluation()],
        limit_val_batches=1,
        limit_test_batches=1,
    )
    dm = GANDataModule(data_dir=mnist_root, download=False)
    validated = trainer.validate(seeded_gan(), datamodule=dm, verbose=False)[0]
    tested = trainer.test(seeded_gan(), datamodule=dm, verbose=False)[0]
    return validated, tested


def test_numbers_match_a_direct_computation(mnist_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    validated, tested = run_test(mnist_root, devices=1)
    gan, dm = seeded_gan(), GANDataModule(data_dir=mnist_root, download=False)
    dm.setup()
    callback = evaluation()
    # The documented rule, by hand: chunk c of 100 samples from noise seeded seed + c.
    chunks = []
    for c in range(7):
        torch.manual_seed(callback.seed + c)
        chunks.append(gan.sample(100).flatten(1))
    centres = torch.cat(chunks)
    assert torch.unique(centres, dim=0).shape[0] == 700  # no chunk repeats another
    trainer = Trainer(accelerator="cpu", devices=1, logger=False)
    torch.testing.assert_close(callback.centres(trainer, gan), centres, rtol=0, atol=0)
    grid = torch.logspace(-1, 0, 10)
    val_lls = parzen_log_likelihood(dm.splits.val.images[:60].flatten(1), centres, grid).double().mean(dim=1)
    sigma = grid[val_lls.argmax()].item()
    assert validated["parzen/sigma"] == pytest.approx(sigma)
    assert validated["parzen/val_ll"] == pytest.approx(val_lls.max().item(), rel=1e-5)
    lls = parzen_log_likelihood(dm.splits.test.images[:TEST_SIZE].flatten(1), centres, sigma).double().numpy()
    assert tested["parzen/test_ll"] == pytest.approx(lls.mean(), rel=1e-5)
    assert tested["parzen/test_se"] == pytest.approx(np.std(lls, ddof=0) / np.sqrt(len(lls)), rel=1e-4)
    out = capsys.readouterr().out
    assert f"Parzen log-likelihood (MNIST test): {lls.mean():.1f} ± " in out
    assert f"sigma {sigma:.4f}, 700 samples, {TEST_SIZE} examples" in out


def _timeout(signum, frame):  # a deadlocked collective fails the test instead of hanging the suite
    raise TimeoutError("DDP Parzen evaluation did not finish in 180 s")


def test_two_ddp_ranks_give_the_numbers_of_one_process(mnist_root: Path) -> None:
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(180)
    try:
        one = run_test(mnist_root, devices=1)
        two = run_test(mnist_root, devices=2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    expected = (("parzen/sigma", "parzen/val_ll"), ("parzen/sigma", "parzen/test_ll", "parzen/test_se"))
    for single, ddp, keys in zip(one, two, expected):
        for key in keys:
            assert key in single and key in ddp, key
            assert ddp[key] == pytest.approx(single[key], abs=1e-4), key


class CountSelections(ParzenEvaluation):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.epochs: list[int] = []

    def select(self, trainer: Trainer, pl_module: GAN, centres: torch.Tensor | None = None) -> float:
        self.epochs.append(trainer.current_epoch)
        return super().select(trainer, pl_module, centres)


def test_sigma_is_selected_every_n_epochs_and_never_in_the_sanity_check(mnist_root: Path) -> None:
    callback = CountSelections(num_samples=200, val_size=20, test_size=20, chunk_size=100, every_n_epochs=2)
    trainer = quiet_trainer(
        callbacks=[callback], max_epochs=4, limit_train_batches=1, limit_val_batches=1, enable_checkpointing=False
    )
    trainer.fit(seeded_gan(), datamodule=GANDataModule(data_dir=mnist_root, download=False))
    assert callback.epochs == [1, 3]  # the 2nd and 4th epochs; the sanity check before epoch 0 is skipped


def test_a_test_run_uses_the_checkpointed_sigma_or_else_selects_one_on_validation(
    mnist_root: Path, tmp_path: Path
) -> None:
    dm = GANDataModule(data_dir=mnist_root, download=False)
    validated, _ = run_test(mnist_root, devices=1)

    def test_alone(**kwargs: object) -> dict[str, float]:
        trainer = quiet_trainer(callbacks=[evaluation()], limit_test_batches=1)  # a fresh callback: no sigma yet
        return trainer.test(seeded_gan(), datamodule=dm, verbose=False, **kwargs)[0]

    assert test_alone()["parzen/sigma"] == pytest.approx(validated["parzen/sigma"])

    callback = evaluation()
    callback.sigma = 0.25  # set by hand, off the grid: used as given, and only the checkpoint can bring it back
    trainer = quiet_trainer(
        callbacks=[callback], max_steps=1, limit_train_batches=1, limit_val_batches=0, default_root_dir=tmp_path
    )
    trainer.fit(seeded_gan(), datamodule=dm)
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    assert test_alone(ckpt_path=checkpoint)["parzen/sigma"] == pytest.approx(0.25)


def test_a_selected_sigma_is_selected_again_for_another_generator_or_validation_split(mnist_root: Path) -> None:
    dm = GANDataModule(data_dir=mnist_root, download=False)
    callback = CountSelections(num_samples=300, val_size=40, test_size=20, chunk_size=100, sigmas=[0.05, 0.2, 0.8])
    trainer = quiet_trainer(callbacks=[callback], limit_val_batches=1, limit_test_batches=1)
    gan = seeded_gan()
    trainer.validate(gan, datamodule=dm, verbose=False)
    assert len(callback.epochs) == 1
    assert callback.state_dict()["chosen_for"] is not None
    trainer.test(gan, datamodule=dm, verbose=False)
    assert len(callback.epochs) == 1  # the same generator and split: the validated sigma is used

    with torch.no_grad():  # a generator trained further (say, a checkpoint saved between two selections)
        gan.generator.output_layer.bias.add_(1.0)
    trainer.test(gan, datamodule=dm, verbose=False)
    assert len(callback.epochs) == 2

    callback.val_size = 30  # another validation split (say, another TFD fold)
    trainer.test(gan, datamodule=dm, verbose=False)
    assert len(callback.epochs) == 3

    restored = CountSelections(num_samples=300, val_size=30, test_size=20, chunk_size=100, sigmas=[0.05, 0.2, 0.8])
    restored.load_state_dict(callback.state_dict())  # as from a checkpoint, in a new process
    quiet_trainer(callbacks=[restored], limit_test_batches=1).test(gan, datamodule=dm, verbose=False)
    assert restored.epochs == []
    assert restored.sigma == callback.sigma

    older = CountSelections(num_samples=300, val_size=30, test_size=20, chunk_size=100, sigmas=[0.05, 0.2, 0.8])
    older.load_state_dict({"sigma": 0.3})  # a checkpoint from before fingerprints: chosen on what, no one knows
    quiet_trainer(callbacks=[older], limit_test_batches=1).test(gan, datamodule=dm, verbose=False)
    assert len(older.epochs) == 1 and older.sigma == callback.sigma


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"val_size": -1}, "val_size"),
        ({"sigmas": [0.1, 0.0]}, "sigmas"),
        ({"sigmas": []}, "sigmas"),
        ({"sigmas": [1e-30, 0.1]}, "sigmas must be at least MIN_SIGMA"),  # refused before training, not after it
        ({"chunk_size": 0}, "chunk_size"),
        ({"test_size": 0}, "test_size"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ParzenEvaluation(**kwargs)


class RandomImages(GANDataModule):
    """Data of one's own, through the documented hook."""

    def load_splits(self) -> Splits:
        generator = torch.Generator().manual_seed(0)

        def split(n: int) -> Split:
            return Split(torch.rand(n, 1, 28, 28, generator=generator), torch.zeros(n, dtype=torch.long))

        return Splits(split(200), split(100), split(TEST_SIZE))


def test_own_data_from_load_splits_is_evaluated_under_its_own_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dm = RandomImages(dataset="random", data_dir=tmp_path / "nothing here", download=False)
    tested = quiet_trainer(callbacks=[evaluation()]).test(seeded_gan(), datamodule=dm, verbose=False)[0]
    assert np.isfinite(tested["parzen/test_ll"])
    assert "Parzen log-likelihood (RandomImages test)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="Unknown dataset 'random'"):
        GANDataModule(dataset="random")


def test_sizes_larger_than_their_split_are_cut_with_one_warning_each(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    dm = RandomImages(dataset="random", data_dir=tmp_path / "nothing here", download=False)  # val 100, test 101
    callback = ParzenEvaluation(num_samples=200, val_size=150, test_size=500, chunk_size=100)
    trainer = quiet_trainer(callbacks=[callback])
    for _ in range(2):  # each size is cut at every selection and test, but said once
        callback.sigma = None
        trainer.test(seeded_gan(), datamodule=dm, verbose=False)
    cut = sorted(str(w.message) for w in recwarn if "is larger than the" in str(w.message))
    assert cut == [
        f"ParzenEvaluation: test_size=500 is larger than the test split ({TEST_SIZE} images): using all {TEST_SIZE}. "
        f"Set test_size to at most {TEST_SIZE} (or null: the whole split).",
        "ParzenEvaluation: val_size=150 is larger than the val split (100 images): using all 100. "
        "Set val_size to at most 100 (or null: the whole split).",
    ]


def test_a_diverged_generator_gets_advice_about_the_generator(tmp_path: Path) -> None:
    dm = RandomImages(dataset="random", data_dir=tmp_path / "nothing here", download=False)
    gan = seeded_gan()
    with torch.no_grad():
        gan.generator.output_layer.bias[0] = float("nan")  # as a diverged generator's
    with pytest.raises(NonFiniteError, match="global step 0\\): the generator has diverged") as raised:
        quiet_trainer(callbacks=[evaluation()]).validate(gan, datamodule=dm, verbose=False)
    assert "generator_optimizer" in str(raised.value) and "nan_to_num" not in str(raised.value)


class ImagesWithoutSplits(LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.rand(8, 1, 28, 28)), batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()


def test_a_datamodule_without_the_images_it_reads_is_refused_before_training() -> None:
    gan = seeded_gan()
    with pytest.raises(ValueError, match=r"ParzenEvaluation needs the val images as `trainer.datamodule.splits"):
        quiet_trainer(callbacks=[evaluation()], max_epochs=1).fit(gan, datamodule=ImagesWithoutSplits())
    assert gan.global_step == 0


@pytest.mark.parametrize(
    "checkpoint",
    [
        {"every_n_epochs": 1},
        {"every_n_epochs": 3},
        {"every_n_train_steps": 10},
    ],
)
def test_a_checkpoint_on_parzen_ll_out_of_step_with_it_is_refused_before_training(
    mnist_root: Path, checkpoint: dict
) -> None:
    callbacks = [
        ParzenEvaluation(num_samples=100, every_n_epochs=2),
        ModelCheckpoint(monitor="parzen/val_ll", mode="max", **checkpoint),
    ]
    gan = seeded_gan()
    with pytest.raises(ValueError, match=r"give the checkpoint `every_n_epochs` 2 \(or a multiple\)"):
        quiet_trainer(callbacks=callbacks).fit(gan, datamodule=GANDataModule(data_dir=mnist_root, download=False))
    assert gan.global_step == 0
