"""Production wiring for the Prefect flows: pools, task runners, plate discovery, GPU hand-off.

Everything a deployment needs to be configured by *data* (deployment parameters, worker
environment variables) instead of code edits: which task runner a flow uses, which
deployment gets GPU work, which plates in a folder still need processing. Heavy or
optional imports (prefect-dask, dask-jobqueue, the Prefect client) happen inside the
functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime as dt
import fnmatch
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hcsseg.config import ProcessConfig
from hcsseg.errors import HcssegError, PlateFormatError
from hcsseg.export.tables import safe_name
from hcsseg.io.plate import open_plate

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun
    from prefect.task_runners import TaskRunner

log = logging.getLogger(__name__)

CPU_POOL = "hcsseg-cpu"
GPU_POOL = "hcsseg-gpu"
GPU_CONCURRENCY_LIMIT = "gpu"
"""Global concurrency limit held around GPU work: ``with concurrency(GPU_CONCURRENCY_LIMIT):``."""
PLATE_READY_EVENT = "hcs.plate.ready"
PLATE_RESOURCE_PREFIX = "hcs.plate."
TASK_RUNNER_ENV = "HCSSEG_TASK_RUNNER"
GPU_DEPLOYMENT_ENV = "HCSSEG_GPU_DEPLOYMENT"
STATUS_DIR = ".hcsseg/runs"  # under stages.LEDGER_DIR, with the stage and well markers
SERVER_TIMEOUT_ENV = "HCSSEG_SERVER_STARTUP_TIMEOUT"
SERVER_TIMEOUT_DEFAULT = 600.0
SERVER_REGISTRY_ENV = "HCSSEG_SERVER_REGISTRY"
SERVER_APP = "prefect.server.api.server:create_app"  # in the embedded server's command line
PR_SET_PDEATHSIG = 1  # linux/prctl.h
CLUSTER_CLASSES_ENV = "HCSSEG_ALLOWED_CLUSTER_CLASSES"
KNOWN_CLUSTER_CLASSES = (
    "distributed.LocalCluster",
    *(
        f"dask_jobqueue.{name}"
        for name in (
            "SLURMCluster",
            "PBSCluster",
            "SGECluster",
            "LSFCluster",
            "HTCondorCluster",
            "OARCluster",
            "MoabCluster",
        )
    ),
    "dask_kubernetes.operator.KubeCluster",
)
"""Cluster classes a run parameter may name; the operator adds more in $CLUSTER_CLASSES_ENV."""
CLUSTER_MODULES = ("distributed", "dask_jobqueue", "dask_kubernetes", "dask_kubernetes.operator")
"""Trusted packages: another `distributed.deploy.Cluster` subclass they export is allowed too."""

PlateState = Literal["submitted", "completed", "failed"]


class TaskRunnerConfig(BaseModel):
    """Where the tasks of one flow run execute.

    ``threads`` (default) runs wells on a thread pool in the flow-run process: ~5 ms per
    task, no serialisation. ``dask`` costs ~100 ms per task but spreads wells over
    processes or machines: a local cluster (neither ``address`` nor ``cluster_class``),
    an existing scheduler (``address``), or a cluster class such as
    ``dask_jobqueue.SLURMCluster`` built with ``cluster_kwargs`` and scaled adaptively
    between ``adapt_minimum`` and ``adapt_maximum`` workers.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["threads", "dask"] = Field("threads", description="thread pool or Dask")
    max_workers: int = Field(
        2, ge=1, description="threads, or worker processes of a local Dask cluster"
    )
    address: str | None = Field(
        None, description="existing Dask scheduler, e.g. tcp://scheduler:8786"
    )
    cluster_class: str | None = Field(
        None,
        description="import path of a Dask cluster class, e.g. dask_jobqueue.SLURMCluster; "
        "only known ones and those listed in $HCSSEG_ALLOWED_CLUSTER_CLASSES on the worker",
    )
    cluster_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for the cluster class"
    )
    adapt_minimum: int | None = Field(None, ge=0, description="adaptive scaling: fewest workers")
    adapt_maximum: int | None = Field(None, ge=1, description="adaptive scaling: most workers")

    @field_validator("cluster_class")
    @classmethod
    def _allowed_cluster(cls, value: str | None) -> str | None:
        """Refuse before anything is imported: a parameter naming e.g. `subprocess.Popen`
        would otherwise run a command on the worker."""
        if value is not None:
            check_cluster_class(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TaskRunnerConfig:
        dask_only = {
            "address": self.address,
            "cluster_class": self.cluster_class,
            "cluster_kwargs": self.cluster_kwargs,
            "adapt_minimum": self.adapt_minimum,
            "adapt_maximum": self.adapt_maximum,
        }
        if self.kind == "threads":
            used = [k for k, v in dask_only.items() if v]
            if used:
                raise ValueError(f"{', '.join(used)} only apply to kind='dask'")
        elif self.address and (self.cluster_class or self.cluster_kwargs or self.adapt_maximum):
            raise ValueError(
                "address (an existing scheduler) excludes cluster_class/cluster_kwargs/adapt_*"
            )
        if (
            self.adapt_minimum is not None
            and self.adapt_maximum is not None
            and self.adapt_minimum > self.adapt_maximum
        ):
            raise ValueError("adapt_minimum must not exceed adapt_maximum")
        return self


class WatchOptions(BaseModel):
    """How `watch-plates` finds plates and hands them on."""

    model_config = ConfigDict(extra="forbid")

    pattern: str = Field("*.zarr", description="glob for plate folders inside the watched folder")
    recursive: bool = Field(False, description="also look in sub-folders")
    min_age_seconds: float = Field(
        60.0,
        ge=0,
        description="skip plates whose top-level metadata changed more recently (still copying)",
    )
    max_plates: int = Field(10, ge=1, description="plates handed on per run; the rest wait")
    max_attempts: int = Field(3, ge=1, description="give up on a plate after this many failures")
    deployment_name: str | None = Field(
        None,
        description="run each plate as a run of this deployment (e.g. 'process-plate/on-demand') "
        "instead of inside the watcher's own process",
    )
    task_runner: TaskRunnerConfig | None = Field(
        None, description="task runner for in-process runs; default: the flow's own"
    )


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


class PlateStatus(BaseModel):
    """Contents of the per-plate status file the watcher keeps beside the tables."""

    model_config = ConfigDict(extra="forbid")

    state: PlateState
    plate_url: str
    attempts: int = 0
    flow_run_id: str | None = None
    message: str = ""
    updated: str = Field(default_factory=lambda: utc_now())

    def moved_to(self, state: PlateState, message: str = "") -> PlateStatus:
        return self.model_copy(update={"state": state, "message": message, "updated": utc_now()})


class PlateCandidate(BaseModel):
    """A plate found in the watched folder, with its status file (if any)."""

    model_config = ConfigDict(extra="forbid")

    plate_url: str
    plate_name: str
    status_path: Path
    status: PlateStatus | None = None


def registered_cluster_classes(env: Mapping[str, str] | None = None) -> set[str]:
    """Import paths the operator allows in ``$HCSSEG_ALLOWED_CLUSTER_CLASSES`` (comma-separated),
    read from the worker's environment, never from a run parameter."""
    raw = (os.environ if env is None else env).get(CLUSTER_CLASSES_ENV, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def check_cluster_class(path: str) -> None:
    """Raise ValueError unless `path` is a known Dask cluster class, one in a trusted cluster
    package, or one the operator registered; no module is imported here."""
    module, _, name = path.rpartition(".")
    if (
        path in KNOWN_CLUSTER_CLASSES
        or path in registered_cluster_classes()
        or (module in CLUSTER_MODULES and name.isidentifier() and not name.startswith("_"))
    ):
        return
    raise ValueError(
        f"cluster_class {path!r} is not an allowed Dask cluster class; allowed: "
        f"{', '.join(KNOWN_CLUSTER_CLASSES)} (or another Cluster class of "
        f"{', '.join(CLUSTER_MODULES[:3])}), plus import paths the operator lists in "
        f"${CLUSTER_CLASSES_ENV} on the worker"
    )


def _import_attr(path: str) -> Any:
    """The allowed cluster class at `path` (checked again: `model_construct` skips validators);
    a class that is not registered by the operator must subclass `distributed` Cluster."""
    try:
        check_cluster_class(path)
    except ValueError as exc:
        raise HcssegError(str(exc)) from None
    module, _, name = path.rpartition(".")
    if not module:
        raise HcssegError(f"cluster_class {path!r} must be a full import path, e.g. module.Class")
    try:
        found = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        raise HcssegError(
            f"cluster_class {path!r}: module {exc.name!r} is not installed "
            f"(e.g. `pip install dask-jobqueue` for SLURM/PBS clusters)"
        ) from exc
    except AttributeError as exc:
        raise HcssegError(f"cluster_class {path!r}: {module} has no {name!r}") from exc
    if path not in registered_cluster_classes():
        from distributed.deploy import Cluster

        if not (isinstance(found, type) and issubclass(found, Cluster)):
            raise HcssegError(f"cluster_class {path!r} is not a Dask cluster class")
    return found


def build_task_runner(config: TaskRunnerConfig | None = None) -> TaskRunner:
    """The task runner a flow run should use (prefect-dask is imported only when asked for)."""
    config = config or TaskRunnerConfig()
    if config.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=config.max_workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ModuleNotFoundError as exc:
        raise HcssegError(
            "kind='dask' needs prefect-dask and distributed: pip install 'hcsseg[dask]'"
        ) from exc
    if config.address:
        return DaskTaskRunner(address=config.address)
    adapt: dict[str, int] = {}
    if config.adapt_minimum is not None:
        adapt["minimum"] = config.adapt_minimum
    if config.adapt_maximum is not None:
        adapt["maximum"] = config.adapt_maximum
    if config.cluster_class:
        return DaskTaskRunner(
            cluster_class=_import_attr(config.cluster_class),
            cluster_kwargs=dict(config.cluster_kwargs),
            adapt_kwargs=adapt or None,
        )
    # One single-threaded process per worker: segmentation holds the GIL in places, and
    # numpy/BLAS threads inside each process would oversubscribe the cores.
    local = {
        "n_workers": config.max_workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        **config.cluster_kwargs,
    }
    return DaskTaskRunner(
        cluster_class=_import_attr("distributed.LocalCluster"),
        cluster_kwargs=local,
        adapt_kwargs=adapt or None,
    )


def task_runner_config_from_env(env: Mapping[str, str] | None = None) -> TaskRunnerConfig | None:
    """`TaskRunnerConfig` from the JSON in ``$HCSSEG_TASK_RUNNER``; None when unset.

    Lets a deployment pick its task runner through ``job_variables.env`` of its work
    pool, without a code change per cluster.
    """
    raw = (os.environ if env is None else env).get(TASK_RUNNER_ENV, "").strip()
    if not raw:
        return None
    try:
        return TaskRunnerConfig.model_validate_json(raw)
    except ValidationError as exc:
        raise HcssegError(f"${TASK_RUNNER_ENV} is not a valid task runner config: {exc}") from exc


def task_runner_from_env(
    env: Mapping[str, str] | None = None, *, default: TaskRunnerConfig | None = None
) -> TaskRunner:
    """The task runner ``$HCSSEG_TASK_RUNNER`` asks for, else ``default`` (thread pool)."""
    return build_task_runner(task_runner_config_from_env(env) or default)


# ---------------------------------------------------------------- embedded Prefect server


def server_registry_dir() -> Path:
    """Per-user folder with one JSON entry per embedded server this user's commands started
    (``$HCSSEG_SERVER_REGISTRY``, else ``$XDG_RUNTIME_DIR/hcsseg-servers``, else
    ``<tmp>/hcsseg-servers-<uid>``): how a later command finds servers a killed one left."""
    override = os.environ.get(SERVER_REGISTRY_ENV, "").strip()
    if override:
        return Path(override)
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "hcsseg-servers"
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"hcsseg-servers-{uid}"


def _registry() -> Path | None:
    """The registry folder, made private; None (no registry) when it is not this user's own:
    entries in a folder others can write would let them pick processes for us to signal."""
    folder = server_registry_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.lstat()
    except OSError as exc:
        log.warning("server registry %s unusable: %s", folder, exc)
        return None
    if not folder.is_dir() or folder.is_symlink():
        log.warning("server registry %s is not a folder; not used", folder)
        return None
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        log.warning("server registry %s is not private to this user; not used", folder)
        return None
    return folder


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process from /proc; None where unavailable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        fields = raw.rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _process_alive(pid: int, start: int | None = None) -> bool:
    """Whether `pid` runs (a zombie does not) and, given its start time, is still the same
    process rather than a later one that reused the id."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    stat = _proc_stat(pid)
    if stat is None:
        return True
    return stat[0] != "Z" and (start is None or stat[1] == start)


def _is_prefect_server(pid: int) -> bool:
    """Whether /proc shows `pid` running the embedded server's uvicorn command; False where
    that cannot be checked, so nothing else is ever signalled."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"uvicorn" in args and SERVER_APP.encode() in args


def _register_server(server_pid: int, port: int | None) -> Path | None:
    """Record a started server with its owner (this process); None without a registry."""
    folder = _registry()
    if folder is None:
        return None
    server, owner = _proc_stat(server_pid), _proc_stat(os.getpid())
    entry = {
        "server_pid": server_pid,
        "server_start": server[1] if server else None,
        "owner_pid": os.getpid(),
        "owner_start": owner[1] if owner else None,
        "port": port,
        "created": utc_now(),
    }
    path = folder / f"{server_pid}.json"
    tmp = folder / f".{server_pid}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot record embedded server %d in %s: %s", server_pid, folder, exc)
        return None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _terminate_process(pid: int, start: int | None, grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _process_alive(pid, start):
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def reap_orphan_servers(*, grace: float = 5.0) -> list[int]:
    """Stop embedded servers whose command died without stopping them (kill -9, OOM) and
    drop stale registry entries; returns the pids stopped.

    A server is only signalled when its owner is gone, it is still the process recorded
    (same start time) and its command line is the Prefect server's.
    """
    folder = _registry()
    if folder is None:
        return []
    stopped = []
    for path in sorted(folder.glob("*.json")):
        try:
            entry = json.loads(path.read_text())
            server, owner = int(entry["server_pid"]), int(entry["owner_pid"])
            server_start, owner_start = entry.get("server_start"), entry.get("owner_start")
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        server_alive = _process_alive(server, server_start)
        if server_alive and _process_alive(owner, owner_start):
            continue  # a running command's own server
        if server_alive and _is_prefect_server(server):
            log.warning("stopping embedded Prefect server %d left by dead %d", server, owner)
            _terminate_process(server, server_start, grace)
            stopped.append(server)
        path.unlink(missing_ok=True)
    return stopped


def _parent_death_signal() -> Callable[[], None] | None:
    """A `preexec_fn` asking Linux to SIGTERM the child when this process dies (even by
    kill -9); None elsewhere. Linux sends it when the *thread* that started the child ends,
    so start the server from a thread that lives as long as it is needed (the main one)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, sig = os.getpid(), int(signal.SIGTERM)

    def set_parent_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return set_parent_death_signal


class EmbeddedServer:
    """Prefect's API server (uvicorn + SQLite) in a child process for one command.

    Prefect's own `SubprocessASGIServer` does the same, but importing it loads all of
    `prefect.server` (~3 CPU s) into this process, which only ever talks HTTP to the
    server. Here the child is started with Prefect 3.8's command line and environment,
    gets the parent-death signal, and is registered while it runs (`reap_orphan_servers`).
    """

    PORTS = range(8000, 9000)
    PORT_IN_USE = 3  # uvicorn's exit status when it cannot bind

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._entry: Path | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @staticmethod
    def _free_port() -> int:
        import random
        import socket

        for _ in range(20):
            port = random.choice(EmbeddedServer.PORTS)
            with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
        raise RuntimeError("no free port for the embedded server in 8000-8999")

    def _launch(self) -> None:
        import prefect
        from prefect.settings import get_current_settings

        self.port = self._free_port()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(prefect.__module_path__.parent),
                "--factory",
                SERVER_APP,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env={
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
                **get_current_settings().to_environment_variables(exclude_unset=True),
            },
            preexec_fn=_parent_death_signal(),
        )
        self._forget()
        self._entry = _register_server(self.process.pid, self.port)

    def start(self, timeout: float) -> None:
        """Launch and wait until `/health` answers; RuntimeError after `timeout` s."""
        import httpx

        atexit.register(self.stop)  # an exit that skips prefect_api's cleanup
        self._launch()
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                assert self.process is not None
                code = self.process.poll()
                if code == self.PORT_IN_USE:  # another process took the port meanwhile
                    self._launch()
                    continue
                if code is not None:
                    raise RuntimeError(f"exited with status {code} before answering")
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"did not answer within {timeout:g} s")

    def _forget(self) -> None:
        if self._entry is not None:
            self._entry.unlink(missing_ok=True)
        self._entry = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        self._forget()


_SERVER: EmbeddedServer | None = None  # the one this process runs, while it runs


def embedded_server() -> EmbeddedServer | None:
    """The embedded server `prefect_api` started in this process, if one is running."""
    return _SERVER


@contextlib.contextmanager
def prefect_api(timeout: float | None = None) -> Iterator[str]:
    """A Prefect API for one command: the configured server, else an embedded one started
    here, once, before the first flow and stopped after the last.

    Prefect would start its own on first use with a 20 s budget, and again in every process
    that lacks the address; on a loaded machine that fails before any work begins. The
    budget here is generous ($HCSSEG_SERVER_STARTUP_TIMEOUT, default 600 s), a failure is
    one clear error, and SIGTERM stops the server instead of orphaning it. On Linux the
    server also gets SIGTERM when this process dies uncleanly (kill -9), and servers that
    an earlier command left anyway are stopped here first (`reap_orphan_servers`).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield str(configured)
        return
    budget = timeout or float(os.environ.get(SERVER_TIMEOUT_ENV, SERVER_TIMEOUT_DEFAULT))
    # a laptop's server has no business phoning home (and logs an ERROR when it cannot)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        reap_orphan_servers()
    except Exception as exc:  # cleanup of others' leftovers must never block this command
        log.warning("could not check for orphaned embedded servers: %s", exc)
    global _SERVER
    server = _SERVER = EmbeddedServer()
    try:
        server.start(timeout=max(1.0, budget))
    except RuntimeError as exc:
        _SERVER = None
        server.stop()
        raise HcssegError(
            f"Prefect's embedded server {exc}; on a busy machine raise ${SERVER_TIMEOUT_ENV}, "
            "or set PREFECT_API_URL to a running server (`prefect server start`)"
        ) from None

    def _terminate(signum: int, _frame: Any) -> None:
        server.stop()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _terminate)
    saved = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url  # worker processes (Dask) find it too
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        signal.signal(signal.SIGTERM, previous)
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved
        _drain_clients()
        server.stop()
        _SERVER = None


def _drain_clients(timeout: float = 30.0) -> None:
    """Send queued events and logs while the server still listens (else each is retried
    against a closed port and logged as an error)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (EventsWorker, APILogWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)


@contextlib.contextmanager
def gpu_slot() -> Iterator[None]:
    """Hold one slot of the `gpu` global concurrency limit while a GPU is in use.

    Only on a machine with CUDA: CPU training needs no slot, and a laptop run with the
    embedded server has no limit to take.
    """
    import torch

    if not torch.cuda.is_available():
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_CONCURRENCY_LIMIT, occupy=1):
        yield


def submit_gpu_work(
    deployment_name: str | None,
    parameters: Mapping[str, Any],
    *,
    timeout: float | None = None,
    idempotency_key: str | None = None,
) -> FlowRun | None:
    """Hand GPU work to a deployment on the GPU pool; None means "run it here".

    ``deployment_name`` (``flow-name/deployment-name``) falls back to
    ``$HCSSEG_GPU_DEPLOYMENT``. With neither set, callers run the work locally. ``timeout``
    is how long to wait for the run to finish (None: wait; 0: return at once).
    """
    name = deployment_name or os.environ.get(GPU_DEPLOYMENT_ENV, "").strip()
    if not name:
        return None
    if "/" not in name:
        raise HcssegError(f"GPU deployment {name!r} must be named 'flow-name/deployment-name'")
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        return run_deployment(
            name,
            parameters=dict(parameters),
            timeout=timeout,
            idempotency_key=idempotency_key,
        )
    except ObjectNotFound as exc:
        raise HcssegError(
            f"GPU deployment {name!r} not found on the Prefect server "
            f"(deploy it: prefect deploy --prefect-file deployments/prefect.yaml --name ...)"
        ) from exc


def check_remote_run(run: FlowRun, what: str) -> None:
    """A deployment run handed work must have completed; anything else is one clear error."""
    state = run.state
    if state is None or not state.is_completed():
        raise HcssegError(
            f"{what} run {run.name} ended {state.name if state else 'without a state'}"
            + (f": {state.message}" if state is not None and state.message else "")
        )


def plate_resource_id(plate_name: str) -> str:
    return f"{PLATE_RESOURCE_PREFIX}{plate_name}"


def emit_plate_ready(
    plate_url: str,
    *,
    plate_name: str | None = None,
    preset: str | None = None,
    config: ProcessConfig | Mapping[str, Any] | None = None,
) -> Any:
    """Tell Prefect a plate is complete on disk; the event-triggered deployment runs it.

    ``preset`` and ``config`` (only the options set) ride in the payload; left out, the
    run uses the `plate-pipeline/on-plate-ready` deployment's own parameters.
    """
    from prefect.events import emit_event

    from hcsseg.pipeline.presets import set_options

    name = plate_name or Path(plate_url.rstrip("/")).stem
    payload: dict[str, Any] = {"plate_url": plate_url}
    if preset:
        payload["preset"] = preset
    if config is not None:
        payload["config"] = set_options(config)
    return emit_event(
        event=PLATE_READY_EVENT,
        resource={"prefect.resource.id": plate_resource_id(name), "hcs.plate.url": plate_url},
        payload=payload,
    )


def deployment_parameter(name: str) -> Any:
    """The current run's deployment's own value of parameter ``name`` (None outside one).

    An event trigger's template renders a missing payload key as None, which replaces the
    deployment's parameter; the flow reads the deployment's value back with this.
    """
    from prefect import get_client
    from prefect.runtime import deployment

    deployment_id = deployment.id
    if not deployment_id:
        return None
    with get_client(sync_client=True) as client:
        return (client.read_deployment(deployment_id).parameters or {}).get(name)


def status_path(plate_url: str, plate_name: str, config: ProcessConfig) -> Path:
    """Where the watcher records a plate's state: ``<tables>/.hcsseg/runs/<plate name>.json``.

    It sits with the tables (not in the plate) so a read-only plate store still works, and
    in the hidden bookkeeping folder so the tables root holds only Parquet datasets.
    """
    return config.output_root(plate_url) / STATUS_DIR / f"{safe_name(plate_name)}.json"


def read_status(path: Path) -> PlateStatus | None:
    if not path.is_file():
        return None
    try:
        return PlateStatus.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise HcssegError(
            f"plate status file {path} is corrupt; delete it to retry: {exc}"
        ) from exc


def write_status(path: Path, status: PlateStatus) -> Path:
    """Atomic write (temp file + rename), so a watcher never reads half a status."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(status.model_dump_json(indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _last_change(plate: Path) -> float:
    """Newest mtime of the plate folder and its top-level metadata files.

    Cheap on purpose (no walk over chunks): acquisition software that writes the plate
    metadata last, or emits ``hcs.plate.ready``, makes this reliable.
    """
    times = [plate.stat().st_mtime]
    for name in ("zarr.json", ".zattrs", ".zgroup"):
        meta = plate / name
        if meta.exists():
            times.append(meta.stat().st_mtime)
    return max(times)


def _plate_dirs(root: Path, pattern: str, *, recursive: bool) -> list[Path]:
    """Folders matching ``pattern``; a recursive search never walks into a zarr store."""
    if not recursive:
        return sorted(p for p in root.glob(pattern) if p.is_dir())
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        descend = []
        for name in dirnames:
            if fnmatch.fnmatch(name, pattern):
                found.append(Path(dirpath) / name)
            elif not name.endswith(".zarr"):
                descend.append(name)
        dirnames[:] = descend
    return sorted(found)


def find_plates(
    folder: str | Path,
    *,
    options: WatchOptions | None = None,
    config: ProcessConfig | None = None,
    now: float | None = None,
    logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
) -> list[PlateCandidate]:
    """HCS plates in ``folder`` that are old enough to be complete, with their status.

    A missing folder is created (warning on ``logger``, e.g. a flow's run logger) and holds
    no plates yet.
    """
    options = options or WatchOptions()
    config = config or ProcessConfig()
    root = Path(folder)
    if not root.exists():
        # a fresh install (infra/bootstrap.sh) points the watcher at a folder nobody made
        # yet: that is "no plates", not a failed run every 10 minutes
        try:
            root.mkdir(parents=True)
        except OSError as exc:
            (logger or log).warning("watched folder %s does not exist: %s", folder, exc)
        else:
            (logger or log).warning("watched folder %s did not exist; created it", folder)
        return []
    if not root.is_dir():
        raise HcssegError(f"watched folder {folder} is not a folder")
    now = time.time() if now is None else now
    found = []
    for path in _plate_dirs(root, options.pattern, recursive=options.recursive):
        if now - _last_change(path) < options.min_age_seconds:
            log.info("skip %s: changed less than %g s ago", path, options.min_age_seconds)
            continue
        try:
            plate = open_plate(path)
        except PlateFormatError as exc:
            log.info("skip %s: %s", path, exc)
            continue
        where = status_path(str(path), plate.name, config)
        found.append(
            PlateCandidate(
                plate_url=str(path),
                plate_name=plate.name,
                status_path=where,
                status=read_status(where),
            )
        )
    return found


def needs_processing(candidate: PlateCandidate, *, max_attempts: int) -> bool:
    """No status yet, or failed fewer than ``max_attempts`` times.

    ``submitted`` plates are not re-submitted here: the watcher first asks the server
    how that run ended (`flows.watch_plates.settle_submitted`).
    """
    status = candidate.status
    if status is None:
        return True
    return status.state == "failed" and status.attempts < max_attempts
