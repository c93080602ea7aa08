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
def plate_write_lock(plate_url: str | Path, command: str) -> Iterator[None]:
    """Hold the plate for `command`; refused at once, naming the holder, if another has it."""
    path, holder = lock_paths(plate_url)
    with _guard:
        lock = _locks.setdefault(path, FileLock(path, thread_local=False))
    first = not lock.is_locked
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            who = holder.read_text().strip()
        except OSError:
            who = "another process"
        raise HcssegError(
            f"plate {Path(plate_url).name} is being processed by another run ({who}); "
            "wait for it to finish or stop it first"
        ) from None
    except OSError as exc:
        raise HcssegError(
            f"cannot lock plate {Path(plate_url).name} for {command}: {path.parent} is not "
            f"writable ({exc.strerror or exc})"
        ) from None
    try:
        if first:
            since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            holder.write_text(
                f"{command}, pid {os.getpid()} on {socket.gethostname()} since {since}\n"
            )
        yield
    finally:
        if first:
            holder.unlink(missing_ok=True)
        lock.release()
