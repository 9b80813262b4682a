"""Ray Jobs: run ``ganpipe run`` on a Ray cluster, follow it, read its status and logs, stop it.

The job is the same pipeline a laptop runs: ``python -m pipelines.cli run [-c PRESET] key=value…``
as the entrypoint, the project folder as the runtime environment's ``working_dir`` (so the code
that runs is the code you submit, not whatever the image last installed), and by default nothing
else: the cluster's image already holds the dependencies. ``pip=True`` adds the project's
dependencies pinned to the versions installed here, for a cluster whose image lacks them.

Everything talks to the Ray dashboard's HTTP API through ``JobSubmissionClient``. Ray 2.60 turns
token authentication on for local clusters; the token is read the way Ray reads it
(``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``) and sent
as a bearer header. Problems a user can fix (no token, wrong token, nothing listening, unknown
job, a preset the cluster cannot see) raise ``JobsError`` with one line naming the fix.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

from pipelines.config import Config, ConfigError, load_config

if TYPE_CHECKING:  # ray is imported only when a command talks to a cluster
    from ray.job_submission import JobDetails, JobInfo, JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
TOKEN_HELP = (
    "set RAY_AUTH_TOKEN to the cluster's token or RAY_AUTH_TOKEN_PATH to a file holding it "
    "(print it on the head node with: ray get-auth-token)"
)
# Never uploaded with the job: environments, VCS data, caches, and run folders (a workdir with
# its MLflow store and checkpoints can be gigabytes; Ray refuses packages over 100 MiB anyway).
WORKING_DIR_EXCLUDES = (
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "build",
    "dist",
    "ganpipe-runs",
    "mlruns",
    "mlartifacts",
    "*.db",
)
# Not pinned by --pip: ray must be the cluster's own version (a second ray in the job's
# environment breaks the connection to it), and torch must stay the image's CUDA build.
NOT_PINNED = frozenset({"ray", "torch"})
POLL_S = 1.0


class JobsError(RuntimeError):
    """A problem the user can fix; ``str()`` is one line saying what and how."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- where the cluster is, who we are


def resolve_address(address: str | None) -> str:
    """The dashboard URL: ``address``, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else loopback."""
    origin = "--address"
    if not address:
        origin, address = next(
            ((var, os.environ[var]) for var in ADDRESS_VARS if os.environ.get(var)),
            ("default", DEFAULT_ADDRESS),
        )
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JobsError(
            f"{origin} {address!r} is not the Ray dashboard's HTTP address "
            "(a GCS address like HOST:6379 is not); pass --address http://HEAD:8265",
            code=2,
        )
    return address.rstrip("/")


def read_token() -> tuple[str | None, str]:
    """The cluster token and where it came from, in Ray's own order (checked against Ray 2.60's
    ``AuthenticationTokenLoader``): RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise JobsError(
                f"RAY_AUTH_TOKEN_PATH={str(path)!r} cannot be read ({exc.strerror or exc}); "
                + TOKEN_HELP
            ) from None
        if not token:
            raise JobsError(f"RAY_AUTH_TOKEN_PATH={str(path)!r} is empty; " + TOKEN_HELP)
        return token, f"RAY_AUTH_TOKEN_PATH={path}"
    path = DEFAULT_TOKEN_FILE.expanduser()
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip(), str(DEFAULT_TOKEN_FILE)
    return None, "none"


@contextmanager
def _address_vars_hidden() -> Iterator[None]:
    """Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its ``address`` argument;
    an explicit --address must win, so they are hidden while the client is built."""
    saved = {var: os.environ.pop(var) for var in ADDRESS_VARS if var in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _probe(address: str, headers: dict[str, str], token_origin: str) -> None:
    """One request with a timeout, so that the common mistakes get their own message (Ray's
    client would wait on an unreachable host without limit and report auth as a stack trace)."""
    import requests

    parts = urlsplit(address)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=10).close()
        response = requests.get(f"{address}/api/version", headers=headers, timeout=30)
    except (OSError, requests.RequestException) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise JobsError(
            f"cannot reach the Ray dashboard at {address} ({reason}): is the cluster up? "
            "(for a `ray up` cluster, `ray dashboard ray_cluster.yaml` forwards it to "
            f"{DEFAULT_ADDRESS})"
        ) from None
    if response.status_code == 401:
        raise JobsError(
            f"the Ray cluster at {address} requires a token and none was found: {TOKEN_HELP}"
        )
    if response.status_code == 403:
        raise JobsError(
            f"the Ray cluster at {address} refused the token from {token_origin}: {TOKEN_HELP}"
        )
    if response.status_code != 200:
        raise JobsError(
            f"{address} answered /api/version with HTTP {response.status_code}: "
            "is this the Ray dashboard's address (port 8265 by default)?"
        )


def connect(address: str | None) -> tuple[JobSubmissionClient, str]:
    """A client for the cluster's Jobs API, and the address it talks to."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token, origin = read_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    _probe(url, headers, origin)
    try:
        with _address_vars_hidden():
            client = JobSubmissionClient(url, headers=headers or None)
    except AuthenticationError:  # the probe passed, so the token changed in between
        raise JobsError(f"the Ray cluster at {url} refused the token from {origin}") from None
    except ConnectionError as exc:
        raise JobsError(f"cannot reach the Ray dashboard at {url}: {exc}") from None
    return client, url


# ---------------------------------------------------------------- what is submitted


@dataclass(frozen=True)
class Submission:
    """What ``submit`` sends: the shell command, the runtime environment, notes for the user."""

    entrypoint: str
    runtime_env: dict[str, Any]
    notes: tuple[str, ...] = field(default=())


def project_root(working_dir: str | Path | None = None) -> Path:
    """The ganpipe source tree to upload: ``working_dir`` or the checkout this code runs from."""
    if working_dir is not None:
        root = Path(working_dir).expanduser().resolve()
        if not (root / "pipelines" / "cli.py").is_file() or not (root / "gan").is_dir():
            raise JobsError(
                f"--working-dir {str(root)!r} does not hold the ganpipe project "
                "(no pipelines/cli.py and gan/); give the folder with pyproject.toml",
                code=2,
            )
        return root
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / "gan").is_dir():
        raise JobsError(
            f"ganpipe runs from {root}, which is not a source checkout (installed from a wheel?); "
            "pass --working-dir PATH to a checkout of the project",
            code=2,
        )
    return root


def pinned_requirements() -> list[str]:
    """The project's own dependencies pinned to the versions installed here (minus ray, torch)."""
    from packaging.requirements import Requirement

    pins = []
    for text in metadata.requires("ganpipe") or []:
        req = Requirement(text)
        if req.marker is not None or req.name.lower() in NOT_PINNED:
            continue  # markers: the dev extra (pytest, moto, ruff) is not needed to run
        version = metadata.version(req.name).split("+")[0]  # "+cpu" builds do not exist on PyPI
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        pins.append(f"{req.name}{extras}=={version}")
    return pins


def _preset_for_cluster(preset: str | None, root: Path) -> str | None:
    """A preset name travels as it is (configs/ is uploaded); a YAML path must lie inside the
    uploaded folder and travels relative to it (the job's working directory is its copy)."""
    if not preset or Path(preset).suffix not in (".yaml", ".yml"):
        return preset
    path = Path(preset).expanduser().resolve()
    if not path.is_relative_to(root):
        raise JobsError(
            f"--config {preset}: the job runs in an uploaded copy of {root}, and this file is "
            "outside it; move it inside the project or use a preset name",
            code=2,
        )
    return path.relative_to(root).as_posix()


def _validated(preset: str | None, overrides: list[str]) -> tuple[Config, list[str]]:
    """Check the config here, before anything is uploaded. A data.source path that does not
    exist here may exist on the cluster: everything else is checked, the source is left to it."""
    notes = []
    try:
        return load_config(preset, overrides), notes
    except ConfigError as exc:
        if not str(exc).startswith("data.source: no such file"):
            raise
        missing = str(exc).split(";")[0]  # the rest lists every supported format
        notes.append(f"{missing}: not here; the cluster checks it when the job starts")
    return load_config(preset, [*overrides, "data.source=digits"]), notes


def prepare_run(
    preset: str | None,
    overrides: list[str],
    working_dir: str | Path | None = None,
    pip: bool = False,
) -> Submission:
    """The job for ``ganpipe run [-c preset] overrides…``; raises ConfigError / JobsError."""
    root = project_root(working_dir)
    preset_arg = _preset_for_cluster(preset, root)
    config, notes = _validated(preset, overrides)

    args = ["python", "-m", "pipelines.cli", "run"]  # -m: the uploaded code, not an installed one
    args += ["-c", preset_arg] if preset_arg else []
    # No tracking_uri is added: without one, `ganpipe run` on the cluster uses the cluster's
    # MLFLOW_TRACKING_URI (ray_cluster.yaml, infra/kuberay), else the workdir's SQLite store.
    entrypoint = shlex.join([*args, *overrides])

    excludes = list(WORKING_DIR_EXCLUDES)
    if "://" not in config.workdir:
        workdir = Path(config.workdir).expanduser()
        if not workdir.is_absolute():
            notes.append(
                f"workdir {config.workdir!r} is relative: on the cluster it lands in the job's "
                "temporary copy of the project; give workdir=ABSOLUTE_PATH on shared storage"
            )
        # A run folder inside the project (relative, or absolute under it) is not uploaded.
        inside = (root / workdir).resolve()
        if inside != root and inside.is_relative_to(root):
            excludes.append("/" + inside.relative_to(root).as_posix())

    runtime_env: dict[str, Any] = {"working_dir": str(root), "excludes": excludes}
    if pip:
        runtime_env["pip"] = pinned_requirements()
    return Submission(entrypoint, runtime_env, tuple(notes))


def new_submission_id() -> str:
    """Readable and sortable: ganpipe-20261127-142501-3fa9c2."""
    return f"ganpipe-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def submit(client: JobSubmissionClient, submission: Submission) -> str:
    """Upload the working dir and start the job; returns the submission id."""
    from ray.exceptions import RayError

    try:
        return client.submit_job(
            entrypoint=submission.entrypoint,
            runtime_env=submission.runtime_env,
            submission_id=new_submission_id(),
            metadata={"ganpipe": "run"},
        )
    except (RuntimeError, ValueError, OSError, RayError) as exc:
        raise JobsError(f"the cluster did not accept the job: {_first_line(exc)}") from None


# ---------------------------------------------------------------- jobs already submitted


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _job_call(address: str, job_id: str, fn: Any, *args: Any) -> Any:
    """Call the client; an unknown id becomes one line saying how to list the jobs."""
    from ray.exceptions import RayError

    try:
        return fn(*args)
    except (RuntimeError, OSError, RayError) as exc:  # OSError: requests' connection errors
        if re.search(r"\b404\b|does not exist", str(exc)):
            raise JobsError(
                f"no job {job_id!r} on the cluster at {address} "
                f"(list them with: ganpipe status --address {address})"
            ) from None
        raise JobsError(f"{address}: {_first_line(exc)}") from None


def info(client: JobSubmissionClient, address: str, job_id: str) -> JobInfo:
    return _job_call(address, job_id, client.get_job_info, job_id)


def list_jobs(client: JobSubmissionClient) -> list[JobDetails]:
    """Jobs on the cluster, the most recently started first."""
    from ray.exceptions import RayError

    try:
        listed = client.list_jobs()
    except (RuntimeError, OSError, RayError) as exc:
        raise JobsError(f"cannot list the jobs: {_first_line(exc)}") from None
    return sorted(listed, key=lambda job: job.start_time or 0, reverse=True)


def logs(client: JobSubmissionClient, address: str, job_id: str) -> str:
    return _job_call(address, job_id, client.get_job_logs, job_id)


def stop(client: JobSubmissionClient, address: str, job_id: str) -> bool:
    """True when the job was running and is being stopped; False when it had already ended."""
    return _job_call(address, job_id, client.stop_job, job_id)


def follow(
    client: JobSubmissionClient, address: str, job_id: str, out: TextIO = sys.stdout
) -> JobInfo:
    """Stream the job's logs to ``out`` until it ends; returns its final info."""
    info(client, address, job_id)  # an unknown id fails here, not inside the log stream

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except (RuntimeError, OSError) as exc:  # the stream broke; the job itself may run on
        out.write(f"[ganpipe] log stream ended early ({_first_line(exc)}); waiting for the job\n")
    while True:  # the stream closes as the job ends; its status may lag a moment behind
        job = info(client, address, job_id)
        if job.status.is_terminal():
            return job
        time.sleep(POLL_S)


def describe(job: JobInfo | JobDetails, job_id: str) -> str:
    """A few aligned lines for ``ganpipe status``."""

    def when(ms: int | None) -> str:
        return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"

    lines = [
        f"{job_id}  {job.status}",
        f"  entrypoint  {job.entrypoint}",
        f"  started     {when(job.start_time)}",
        f"  ended       {when(job.end_time)}",
    ]
    if getattr(job, "job_id", None):  # set once the driver has connected to the cluster
        lines.append(f"  ray job     {job.job_id}")
    if job.message:
        lines.append(f"  message     {job.message.strip()}")
    return "\n".join(lines)
