"""Files that appear whole or not at all, and the temporary files of writers that were killed."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["ORPHAN_AGE_S", "atomic_write", "dead_process_of_this_host", "host_name", "remove_orphaned_temporaries"]

# A temporary file of another host (a shared file system) is removed once it is this old: no write takes a day.
ORPHAN_AGE_S = 24 * 3600
# ... and one of a process of this host that is gone, once it has not changed for this long: a writer in another pid
# namespace (a container) with the same host name would look dead, but its file changes as it is written
_QUIET_S = 60
# `.<target>.<host>.<pid>.<8 hex>.tmp`; lightning-gan 0.1.0 wrote `.<target>.<pid>.<8 hex>.tmp` (no host)
_TEMPORARY = re.compile(r"^\..+?(?:\.(?P<host>[A-Za-z0-9-]+))?\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def host_name(host: str | None = None) -> str:
    """``host`` (default: this host's name) as the package writes it into file names and lock files."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname() if host is None else host) or "host"


def dead_process_of_this_host(host: str, pid: int) -> bool:
    """Whether ``pid`` on ``host`` is a process of this host that has ended."""
    if host_name(host) != host_name():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: a process of another user holds that pid
        return False
    return False


def remove_orphaned_temporaries(folder: str | Path, max_age_s: float = ORPHAN_AGE_S) -> list[Path]:
    """Remove the temporary files that :func:`atomic_write` left in ``folder`` when its process was killed (``kill
    -9``, a power cut): those of a process of this host that is gone (unchanged for a minute), and any older than
    ``max_age_s`` seconds (of another host, or of an older version, whose names say no host). Returns the files
    removed.

    A temporary file of a live process of this host, or a recent one of another host, is left alone: it may be
    being written.
    """
    folder, now, removed = Path(folder), time.time(), []
    with contextlib.suppress(OSError):  # a folder that is missing or unreadable holds nothing to clean
        for entry in os.scandir(folder):
            match = _TEMPORARY.match(entry.name)
            if match is None or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):  # gone already (another cleaner), or not ours to remove
                host, pid, age = match["host"], int(match["pid"]), now - entry.stat().st_mtime
                quiet = host is not None and pid != os.getpid() and age > _QUIET_S
                if (quiet and dead_process_of_this_host(host, pid)) or age > max_age_s:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(file)`` so that readers, and a crash at any moment, see the previous file or the
    new one whole, never a part.

    ``write`` fills a hidden temporary file in ``path``'s folder (created when missing), named after this host and
    process, which is flushed, synced to disk (``fsync``) and renamed over ``path`` (``os.replace``, atomic within one
    file system); the folder is synced then, so that the rename survives a power cut. On any exception the temporary
    file is removed; those of killed writers are removed first (:func:`remove_orphaned_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(path.parent)
    temporary = path.with_name(f".{path.name}.{host_name()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        if _disk_full(error):  # torch.save reports it as "RuntimeError: [enforce fail ...] unexpected pos ..."
            raise OSError(
                errno.ENOSPC,
                f"No space left on device writing {path}: free some space there, or write the run to another "
                "folder (e.g. --trainer.default_root_dir=DIR); the previous file, if any, is intact",
            ) from error
        raise
    _fsync_folder(path.parent)


def _disk_full(error: BaseException | None) -> bool:
    """Whether ``error``, or an exception it was raised from or while handling, is a full disk or quota."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder; its rename is durable enough
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
