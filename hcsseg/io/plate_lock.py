"""One lock per plate for every command that writes to it.

`process` (labels), `virtual-stain` (a channel), `import` (the whole plate) and the pipeline
all take it, so two writers can never interleave: two virtual-stain runs once left fields
listing `DNA_virtual` twice. The lock sits beside the plate, not in a tables folder (two runs
with different `--output` wrote the same plate) and not inside it (an import replaces the
plate folder). It is an OS lock (`filelock`: flock, msvcrt on Windows) that dies with its
holder, so a killed run never blocks the next; it is re-entrant within one process, so the
pipeline's subflows run under the pipeline's lock.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from hcsseg.errors import HcssegError

_guard = threading.Lock()
_locks: dict[Path, FileLock] = {}


def lock_paths(plate_url: str | Path) -> tuple[Path, Path]:
    """The lock file and its holder note: ``.<plate folder>.hcsseg-lock`` beside the plate."""
    final = Path(plate_url).absolute()
    base = final.with_name(f".{final.name}.hcsseg-lock")
    return base, base.with_name(base.name + ".holder")


@contextmanager
def exclusive(
    path: Path, holder: Path, *, holder_note: str, name: str, reentrant: bool = False
) -> Iterator[None]:
    """Hold the OS lock at `path`, refused at once if another process has it, naming the
    holder from the note in `holder` (filelock owns the lock file itself). `reentrant`: this
    process may take it again (the note stays the first taker's)."""
    with _guard:
        lock = _locks.get(path) if reentrant else None
        if lock is None:
            lock = FileLock(path, thread_local=not reentrant)
            if reentrant:
                _locks[path] = lock
    first = not lock.is_locked
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            who = holder.read_text().strip()
        except OSError:
            who = "another process"
        raise HcssegError(
            f"plate {name} is being processed by another run ({who}); "
            "wait for it to finish or stop it first"
        ) from None
    except OSError as exc:
        raise HcssegError(
            f"cannot lock plate {name}: {path.parent} is not writable ({exc.strerror or exc})"
        ) from None
    try:
        if first:
            since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            holder.write_text(
                f"{holder_note}pid {os.getpid()} on {socket.gethostname()} since {since}\n"
            )
        yield
    finally:
        if first:
            holder.unlink(missing_ok=True)
        lock.release()


@contextmanager
def plate_write_lock(plate_url: str | Path, command: str) -> Iterator[None]:
    """Hold the plate for `command`; refused at once, naming the holder, if another has it."""
    path, holder = lock_paths(plate_url)
    name = Path(plate_url).name
    with exclusive(path, holder, holder_note=f"{command}, ", name=name, reentrant=True):
        yield
