"""lightning_gan.files: a file appears whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import pytest

from lightning_gan.files import atomic_write


def test_atomic_write_syncs_the_new_file_and_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "figures" / "grid.png"  # the folder is created
    synced: list[os.stat_result] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda descriptor: synced.append(os.fstat(descriptor)) or real_fsync(descriptor))
    atomic_write(path, lambda file: file.write(b"new"))
    assert path.read_bytes() == b"new"
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]
    # the file's data before the rename (the rename keeps the inode), then the folder's entry for it
    assert synced[0].st_ino == path.stat().st_ino
    if os.name == "posix":
        assert [s.st_ino for s in synced[1:]] == [path.parent.stat().st_ino]


def test_a_failed_atomic_write_leaves_the_previous_file_and_no_temporary_one(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"previous")

    def killed_half_way(file: BinaryIO) -> None:
        file.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, killed_half_way)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
