"""lightning_gan.files: a file appears whole or not at all."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import torch

from lightning_gan import files
from lightning_gan.files import ORPHAN_AGE_S, atomic_write, remove_orphaned_temporaries


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


def test_temporary_files_are_named_after_the_host_and_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    renamed: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append(Path(src).name) or real_replace(src, dst))
    atomic_write(tmp_path / "last.ckpt", lambda file: file.write(b"new"))
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())
    assert re.fullmatch(rf"\.last\.ckpt\.{re.escape(host)}\.{os.getpid()}\.[0-9a-f]{{8}}\.tmp", renamed[0])


def test_a_writer_killed_mid_write_leaves_a_temporary_file_that_the_next_write_removes(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    killed_writer = (  # files.py alone (it imports nothing of the package): no seconds of torch import
        "import importlib.util, os, signal, sys\n"
        "spec = importlib.util.spec_from_file_location('files', sys.argv[2])\n"
        "files = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(files)\n"
        "atomic_write = files.atomic_write\n"
        "def write(file):\n"
        "    file.write(b'half a checkpoint')\n"
        "    file.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write(sys.argv[1], write)\n"
    )
    command = [sys.executable, "-c", killed_writer, str(path), files.__file__]
    result = subprocess.run(command, env=os.environ, check=False)
    assert result.returncode == -signal.SIGKILL
    (orphan,) = tmp_path.iterdir()  # what kill -9 leaves behind
    assert orphan.name.startswith(".last.ckpt.") and orphan.name.endswith(".tmp")
    atomic_write(tmp_path / "other.png", lambda file: file.write(b"png"))
    assert orphan.exists()  # changed within the last minute: it could be a live writer's in another pid namespace
    os.utime(orphan, (time.time() - 120, time.time() - 120))
    atomic_write(tmp_path / "other.png", lambda file: file.write(b"png"))  # any write to the folder cleans it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.png"]


def test_only_orphaned_temporary_files_are_removed(tmp_path: Path) -> None:
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    dead, live = int(gone.stdout), os.getppid()
    names = {
        "dead": f".last.ckpt.{host}.{dead}.0123abcd.tmp",  # a process of this host that is gone
        "live": f".last.ckpt.{host}.{live}.0123abcd.tmp",  # one that may still be writing
        "elsewhere": f".last.ckpt.other-host.{dead}.0123abcd.tmp",  # another host's, recent
        "old": f".last.ckpt.other-host.{live}.4567abcd.tmp",  # another host's, older than the bound
        "unversioned": f".last.ckpt.{dead}.89abcdef.tmp",  # 0.1.0's name (no host), recent
        "user": ".notes.tmp",  # not one of ours
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    stale, quiet = time.time() - ORPHAN_AGE_S - 60, time.time() - 120
    for name in names.values():
        os.utime(tmp_path / name, (quiet, quiet))  # none written to in the last minute
    os.utime(tmp_path / names["old"], (stale, stale))
    removed = remove_orphaned_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([names["dead"], names["old"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[key] for key in ("live", "elsewhere", "unversioned", "user")
    )


def test_a_full_disk_is_named_with_the_path_on_the_last_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"previous")
    real_open = open

    def open_on_a_full_disk(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        return real_open("/dev/full", "wb") if str(file).endswith(".tmp") else real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", open_on_a_full_disk, raising=False)  # writes there fail with ENOSPC
    with pytest.raises(OSError, match=rf"No space left on device writing {re.escape(str(path))}") as raised:
        atomic_write(path, lambda file: torch.save({"weights": torch.zeros(100_000)}, file))
    assert raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

    def as_torch_save_reports_it(file: BinaryIO) -> None:  # its zip writer's error, raised while handling ENOSPC
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.undo()
    with pytest.raises(OSError, match=rf"No space left on device writing {re.escape(str(path))}"):
        atomic_write(path, as_torch_save_reports_it)
    with pytest.raises(RuntimeError, match="unexpected pos"):  # the same error without a full disk: as it was
        atomic_write(path, lambda file: (_ for _ in ()).throw(RuntimeError("unexpected pos")))
