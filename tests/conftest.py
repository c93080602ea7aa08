from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# The embedded Prefect server logs its shutdown after pytest has closed the captured
# streams; keep Prefect's own loggers at WARNING in tests to avoid that noise.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HCSSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of ../shared/data; tests that need it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def dataset(shared_data: Path, name: str) -> Path:
    path = shared_data / name
    if not path.is_dir():
        pytest.skip(f"shared data set {name} not found at {path}")
    return path


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread: on a shared 2-core runner, two threads contending with other jobs
    made these trainings 10-30x slower (thread barriers waiting on preempted threads)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
