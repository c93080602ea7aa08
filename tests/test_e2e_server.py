"""A real Prefect server, deployments from deployments/prefect.yaml, and a process worker.

What production does, on a laptop: `prefect server start` (SQLite, and PostgreSQL when
Debian's postgresql is installed), `prefect deploy`, `prefect deployment run`, an
`hcs.plate.ready` event firing the event-triggered deployment, then
`prefect worker start --run-once` executing both runs in subprocesses. Everything runs
in temporary folders; the server (and database) are stopped in ``finally``.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect.events import Event
from prefect.workers.process import ProcessWorker

from hcsseg.demo import synthetic_plate
from hcsseg.io.plate import open_plate
from hcsseg.pipeline.orchestration import PLATE_READY_EVENT, plate_resource_id

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
POOL = "hcsseg-cpu"

pytestmark = pytest.mark.timeout(420)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _base_env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_") and k != "HCSSEG_TASK_RUNNER"
    }
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        HCSSEG_REPO=str(REPO),
    )
    return env


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@contextmanager
def prefect_server(home: Path, database_url: str | None = None) -> Iterator[dict[str, str]]:
    """`prefect server start` on a free port; yields the env clients need."""
    port = _free_port()
    env = _base_env(home)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    log = home / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited with {proc.returncode}:\n{_tail(log)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after 120 s:\n{_tail(log)}")
            time.sleep(0.5)
        client_env = {k: v for k, v in env.items() if k != "PREFECT_API_DATABASE_CONNECTION_URL"}
        client_env["PREFECT_API_URL"] = url
        yield client_env
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _cli(env: dict[str, str], *args: str, timeout: float = 180) -> str:
    done = subprocess.run(
        [PREFECT, *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{output[-4000:]}"
    return output


def _api(env: dict[str, str], method: str, path: str, body: object = None) -> Any:
    response = httpx.request(method, f"{env['PREFECT_API_URL']}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json() if response.content else None


def _runs_of(env: dict[str, str], deployment: str) -> list[dict]:
    dep = _api(env, "GET", f"/deployments/name/{deployment}")
    return _api(env, "POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}})


def _read_flow_run(env: dict[str, str], run_id: str):
    """Through Prefect's own client, as the brief of this test asks."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        run = client.read_flow_run(UUID(run_id))
        artifacts = client.read_artifacts(limit=50)
    return run, artifacts


def _check_outputs(plate_url: str, wells: list[str] | None = None) -> None:
    """Labels and a cell table for every well asked for (default: all of them)."""
    plate = open_plate(plate_url)
    wells = wells or plate.wells()
    for ref in plate.iter_fields(wells):
        assert {"nuclei", "cells"} <= set(plate.label_names(ref)), ref
    tables = Path(plate_url).with_name(Path(plate_url).stem + "_tables")
    cells = sorted(p.stem for p in (tables / "cells").rglob("*.parquet"))
    assert cells == sorted(wells), cells


def run_scenario(tmp: Path, env: dict[str, str], *, with_event: bool) -> None:
    plates = tmp / "plates"
    on_demand = synthetic_plate(
        plates / "e2e.zarr", wells=("B02", "B03"), fields_per_well=1, shape=(256, 256)
    ).url
    # Pool and event through the REST API: each `prefect` CLI call costs ~5 s of imports.
    template = ProcessWorker.get_default_base_job_template()
    _api(
        env,
        "POST",
        "/work_pools/",
        {"name": POOL, "type": "process", "base_job_template": template},
    )
    names = ["--name", "process-plate/on-demand"] + (
        ["--name", "plate-pipeline/on-plate-ready"] if with_event else []
    )
    _cli(env, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", *names)
    _cli(env, "deployment", "run", "process-plate/on-demand", "--param", f"plate_url={on_demand}")
    (run,) = _runs_of(env, "process-plate/on-demand")
    runs: dict[str, tuple[str, str, list[str] | None]] = {
        run["id"]: (on_demand, "plate-qc-demo-synthetic-", None)
    }

    if with_event:
        # one event names its preset and options, the other leaves them to the deployment
        told = synthetic_plate(
            plates / "told.zarr", wells=("C02", "C03"), fields_per_well=1, shape=(256, 256)
        ).url
        bare = synthetic_plate(
            plates / "bare.zarr", wells=("D02",), fields_per_well=1, shape=(256, 256)
        ).url
        payloads = {
            told: {"plate_url": told, "preset": "classical", "config": {"wells": ["C02"]}},
            bare: {"plate_url": bare},
        }
        for name, payload in (("told", payloads[told]), ("bare", payloads[bare])):
            event = Event(
                event=PLATE_READY_EVENT,
                resource={"prefect.resource.id": plate_resource_id(name)},
                payload=payload,
            )
            _api(env, "POST", "/events", [event.model_dump(mode="json")])
        deadline = time.monotonic() + 60
        while len(triggered := _runs_of(env, "plate-pipeline/on-plate-ready")) < 2:
            assert time.monotonic() < deadline, "hcs.plate.ready did not trigger two flow runs"
            time.sleep(1)
        by_plate = {t["parameters"]["plate_url"]: t for t in triggered}
        assert by_plate[told]["parameters"] == payloads[told]
        # missing keys render as null; the flow then takes the deployment's own preset
        assert by_plate[bare]["parameters"] == {"plate_url": bare, "preset": None, "config": None}
        runs[by_plate[told]["id"]] = (told, "pipeline-report-demo-synthetic-", ["C02"])
        runs[by_plate[bare]["id"]] = (bare, "pipeline-report-demo-synthetic-", None)

    _cli(env, "worker", "start", "--pool", POOL, "--run-once", timeout=300)

    for run_id, (plate_url, prefix, wells) in runs.items():
        flow_run, artifacts = _read_flow_run(env, run_id)
        assert flow_run.state is not None
        assert flow_run.state.is_completed(), (flow_run.state.type, flow_run.state.message)
        _check_outputs(plate_url, wells)
        mine = [a for a in artifacts if a.flow_run_id == flow_run.id]
        found = [a for a in mine if (a.key or "").startswith(prefix)]
        assert len(found) == 1, [a.key for a in mine]
        if prefix.startswith("pipeline-report"):
            assert (found[0].description or "").startswith("classical pipeline on")
    _, artifacts = _read_flow_run(env, next(iter(runs)))
    keys = {a.key for a in artifacts if (a.key or "").startswith("plate-qc-demo-synthetic-")}
    # same plate name in every store: one QC artifact key per store, none overwritten
    assert len(keys) == len(runs), keys


def test_deploy_run_and_trigger_on_a_sqlite_server(tmp_path):
    home = tmp_path / "prefect-home"
    home.mkdir()
    with prefect_server(home) as env:
        run_scenario(tmp_path, env, with_event=True)


# ---------------------------------------------------------------- PostgreSQL


def _initdb() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on a free port; yields an asyncpg URL."""
    bindir = _initdb()
    if bindir is None:
        pytest.skip(
            "PostgreSQL not installed (/usr/lib/postgresql/*/bin/initdb); "
            "apt-get install -y postgresql"
        )
    pytest.importorskip("asyncpg", reason="asyncpg (Prefect's PostgreSQL driver) not installed")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL")
        try:
            import pwd

            pg = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run PostgreSQL as")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="hcsseg-pg-"))
    if as_user:
        os.chown(root, pg.pw_uid, pg.pw_gid)
    data, port = root / "data", _free_port()

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}"

    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "prefect", "--auth=trust", "-E", "UTF8")
        run(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "postgres.log"),
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
            "-w",
            "start",
        )
        started = True
        run(
            str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect"
        )
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
    finally:
        if started:
            subprocess.run(
                [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)


def test_deploy_and_run_on_a_postgresql_server(tmp_path):
    home = tmp_path / "prefect-home"
    home.mkdir()
    with postgres_cluster() as database_url, prefect_server(home, database_url) as env:
        run_scenario(tmp_path, env, with_event=False)
