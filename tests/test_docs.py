"""The README and docs/: size, links that resolve, no reference outside the repository, the test command CI runs,
and the README's subclassing example, run as written."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M):
        text = "".join(c for c in heading.lower() if c in " -_" or unicodedata.category(c)[0] in "LN")
        found.add(text.replace(" ", "-"))
    return found


def test_readme_is_at_most_10000_bytes() -> None:
    assert len(README.read_bytes()) <= 10_000


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.is_file(), f"{page.name}: {target} is not a file"
        assert file.is_relative_to(REPO), f"{page.name}: {target} is outside the repository"
        if anchor:
            assert anchor in anchors(file.read_text()), f"{page.name}: no heading for #{anchor} in {file.name}"


def test_nothing_refers_to_files_outside_the_repository() -> None:
    texts = [*PAGES, *sorted((REPO / "lightning_gan").rglob("*.py"))]
    for path in texts:
        text = path.read_text()
        for name in ("PAPER.md", "DESIGN.md", "DESIGN default", "../shared", "STYLE.md"):
            assert name not in text, f"{path.relative_to(REPO)} mentions {name}"


def test_the_readme_test_command_is_what_ci_runs() -> None:
    readme, ci = README.read_text(), (REPO / ".ci" / "run").read_text()
    (command,) = [line for line in readme.splitlines() if line.endswith("python -m pytest -q")]
    assert 'pip install -e ".[test]" && python -m pytest -q' in command
    assert 'pip install --quiet -e ".[test]"' in ci and "\npython -m pytest -q\n" in ci


def test_the_readme_first_command_trains_the_quickstart_and_tests_it() -> None:
    first = next(line for line in README.read_text().splitlines() if line.startswith("python3 -m venv"))
    assert first.endswith("lightning-gan fit --config configs/quickstart.yaml --test_after_fit true")
    assert "--model.help GAN" in README.read_text() and "--data.data_dir DIR" in README.read_text()


def test_the_readme_subclassing_example_runs_as_written(
    mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (code,) = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert code.startswith("from ") and "GANDataModule()" in code
    fit = "Trainer(max_epochs=1).fit("
    assert fit in code
    # as written, on a folder `data` that holds MNIST (no download), two training steps instead of an epoch
    (tmp_path / "data").symlink_to(mnist_root / "MNIST" / "..", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    quick = "Trainer(max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False)\ntrainer.fit("
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code.replace(fit, "trainer = " + quick), "README.md", "exec"), namespace)
    assert namespace["trainer"].global_step == 2
    assert type(namespace["trainer"].lightning_module).__name__ == "LeastSquaresGAN"
