"""``ganpipe``: parses and validates arguments, then hands over to the pipeline.

Every config error is reported before Ray starts, as one line naming the key, with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from datetime import datetime
from pathlib import Path

from pipelines.config import Config, ConfigError, describe, load_config, validate_population

DEFAULT_WORKDIR = Config().workdir


def _fail(message: str, code: int = 1) -> int:
    print(f"ganpipe: error: {message}", file=sys.stderr)
    return code


def _tracking_uri(workdir: str, tracking_uri: str | None) -> str:
    return Config(workdir=workdir, tracking_uri=tracking_uri or "").resolved_tracking_uri


LOCATION_KEYS = ("workdir", "tracking_uri", "experiment")


def _resumed_config(config: Config, args: argparse.Namespace) -> Config:
    """The config an earlier run was started with, found in the store ``config`` points at."""
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import KIND_TAG, client_for

    other = [o for o in args.overrides if o.split("=", 1)[0] not in LOCATION_KEYS]
    if args.config or other:
        raise ConfigError(
            "--resume continues a run with the config it was started with; "
            f"only {', '.join(LOCATION_KEYS)} may be given with it"
        )
    try:
        run = client_for(config).get_run(args.resume)
    except MlflowException:
        run = None
    if run is None or run.data.tags.get(KIND_TAG) != "pipeline":
        raise ConfigError(
            f"--resume: no pipeline run {args.resume!r} in {config.resolved_tracking_uri} "
            "(list them with: ganpipe runs)"
        )
    params = run.data.params
    kept = {k: getattr(config, k) for k in LOCATION_KEYS}
    values = [f"{k}={v}" for k, v in params.items() if k not in LOCATION_KEYS]
    return load_config(None, values + [f"{k}={v}" for k, v in kept.items()])


def cmd_run(args: argparse.Namespace) -> int:
    return _run_dag(args, tune=False)


def cmd_tune(args: argparse.Namespace) -> int:
    return _run_dag(args, tune=True)


def _run_dag(args: argparse.Namespace, *, tune: bool) -> int:
    try:
        config = load_config(args.config, args.overrides)
        # After the config: the steps import MLflow, over a second that a typo need not wait.
        from pipelines.steps.default_dag import default_dag, tune_dag

        dag = tune_dag() if tune else default_dag()
        unknown = [name for name in args.force if name not in dag.names]
        if unknown:
            raise ConfigError(f"--force {unknown[0]}: no such step; steps: {', '.join(dag.names)}")
        if args.resume:
            config = _resumed_config(config, args)
        if tune:
            validate_population(config)
        elif not os.environ.get("RAY_ADDRESS"):  # tune advertises what its population needs
            from pipelines.runner import check_local_resources

            check_local_resources(config)
    except ConfigError as exc:
        return _fail(f"config: {exc}", 2)
    from pipelines.storage import StorageError, check_storage

    try:  # a local folder writable, S3 buckets there and open to this machine's credentials
        check_storage(config)
    except (PermissionError, StorageError) as exc:
        return _fail(str(exc), 2)

    from pipelines.runner import StepFailed, init_ray, run_pipeline

    if tune:  # every trial's workers at once, even if that oversubscribes a laptop's cores
        t = config.train
        init_ray(
            num_cpus=max(
                (os.cpu_count() or 1) + 1,
                config.tune.population * t.workers * t.threads_per_worker + 1,
            )
        )
    try:
        result = run_pipeline(
            dag,
            config,
            resume_run_id=args.resume,
            force=tuple(args.force),
            use_cache=not args.no_cache,
        )
    except StepFailed as exc:
        return _fail(
            f"{exc}\n(see the step's run in MLflow: {config.resolved_tracking_uri}; "
            "run the same command again to resume)"
        )
    except KeyboardInterrupt:
        return _fail("interrupted; run the same command again to resume", 130)

    metrics = result.outputs["evaluate"]["metrics"]
    reg = result.outputs["register"]
    workdir_flag = "" if config.workdir == DEFAULT_WORKDIR else f" --workdir {config.workdir}"
    tracking_flag = f" --tracking-uri {config.tracking_uri}" if config.tracking_uri else ""
    print()
    print("Evaluation (Fréchet distance in the features of a classifier of the dataset)")
    print(f"  generator             {metrics['frechet_distance']:10.3f}")
    print(f"  floor (train images)  {metrics['frechet_distance_floor']:10.3f}")
    print(f"  Gaussian baseline     {metrics['frechet_distance_gaussian']:10.3f}")
    print(f"  Gaussian mixture      {metrics['frechet_distance_gmm']:10.3f}  (10 components)")
    print(f"  classes covered       {metrics['class_coverage']:10d}")
    print(f"  mean confidence       {metrics['mean_confidence']:10.3f}")
    print(f"  KID                   {metrics['kid']:10.4f}")
    print(f"  precision / recall    {metrics['precision']:10.3f} / {metrics['recall']:.3f}")
    print(f"  memorization ratio    {metrics['memorization_ratio']:10.3f}  (< 1: closer to "
          "training images than held-out images are)")  # fmt: skip
    print(f"Registered: {reg['model_uri']}  (version {reg['version']}, {reg['alias']})")
    steps = [
        f"{name} {'cached' if s.status == 'cached' else f'{s.duration:.0f}s'}"
        for name, s in result.steps.items()
    ]
    print("Steps:      " + ", ".join(steps))
    print(f"MLflow UI:  ganpipe ui{workdir_flag}{tracking_flag}")
    print(
        "Sample:     ganpipe generate --model "
        f"models:/{reg['model_name']}@champion -n 64 --out grid.png{workdir_flag}{tracking_flag}"
    )
    return 0


def _whole_number(flag: str, text: str, minimum: int) -> int:
    """``text`` as an int >= ``minimum``; a ValueError whose message names the flag."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{flag} must be a whole number, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {value}")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cmd_generate(args: argparse.Namespace) -> int:
    # -n and --seed are parsed here, not by argparse, so that a bad value is one line, not usage.
    try:
        count = _whole_number("-n", args.n, 1)
        first_seed = _whole_number("--seed", args.seed, 0)
    except ValueError as exc:
        return _fail(str(exc), 2)
    import mlflow
    import pandas as pd
    import torch

    from pipelines.images import save_grid

    mlflow.set_tracking_uri(_tracking_uri(args.workdir, args.tracking_uri))
    try:
        model = mlflow.pyfunc.load_model(args.model)
    except Exception as exc:  # MlflowException and friends: the message says what is missing
        return _fail(
            f"cannot load model {args.model!r} from {mlflow.get_tracking_uri()}: {_first_line(exc)}"
        )
    try:
        images = model.predict(pd.DataFrame({"seed": range(first_seed, first_seed + count)}))
    except Exception as exc:  # the model's own refusal (too many images, a bad seed)
        return _fail(f"model {args.model!r} refused the request: {_first_line(exc)}", 2)
    chw = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(chw, out)
    print(f"wrote {len(images)} images to {out}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from pipelines.registry import CHAMPION, RegistryError, promote

    uri = _tracking_uri(args.workdir, args.tracking_uri)
    try:
        previous = promote(MlflowClient(uri), args.name, args.version)
    except RegistryError as exc:
        return _fail(f"{exc} (tracking store: {uri})", 2)
    if previous == str(args.version):
        print(f"{args.name}@{CHAMPION} is already version {args.version}")
        return 0
    was = f"version {previous}" if previous is not None else "none"
    print(f"{args.name}@{CHAMPION} is now version {args.version} (was: {was})")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    uri = _tracking_uri(args.workdir, args.tracking_uri)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    command += ["--host", args.host, "--port", str(args.port)]
    print(f"MLflow UI on http://{args.host}:{args.port} ({shlex.join(command[1:])})", flush=True)
    os.execv(command[0], command)
    return 0  # not reached


def cmd_server(args: argparse.Namespace) -> int:
    from pipelines.server import (
        BackendUnavailable,
        check_backend,
        default_artifacts_destination,
        default_backend_uri,
        redact,
        server_command,
        server_environment,
    )

    if not 0 < args.port < 65536:
        return _fail(f"--port must be between 1 and 65535, got {args.port}", 2)
    if args.workers is not None and args.workers < 1:
        return _fail(f"--workers must be >= 1, got {args.workers}", 2)
    if not args.backend_store_uri:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    backend = args.backend_store_uri or default_backend_uri(args.workdir)
    artifacts = args.artifacts_destination or default_artifacts_destination(args.workdir)
    try:
        check_backend(backend)
    except BackendUnavailable as exc:
        return _fail(str(exc), 2)
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    uri = f"http://{args.host if loopback else '<this-host>'}:{args.port}"
    print(f"MLflow tracking server on {args.host}:{args.port}")
    print(f"  backend store  {redact(backend)}")
    print(f"  artifacts      {artifacts} (served through the server)")
    print(f"  use it with    ganpipe run tracking_uri={uri}")
    print(f"            or   export MLFLOW_TRACKING_URI={uri}")
    if not loopback:
        print(
            "  warning: MLflow has no authentication by default; anyone who reaches this port "
            "can read and change every run and model. Keep it on a private network or behind "
            "an authenticating proxy (see docs/tracking.md).",
            file=sys.stderr,
        )
    sys.stdout.flush()
    command = server_command(
        backend, artifacts, args.host, args.port, args.workers, args.allowed_hosts
    )
    os.execve(command[0], command, server_environment())
    return 0  # not reached


def _on_cluster(args: argparse.Namespace, body) -> int:
    """Connect to the Ray cluster and run ``body(client, address)``; JobsError is one line."""
    from pipelines import jobs

    try:
        client, address = jobs.connect(args.address)
        return body(client, address)
    except jobs.JobsError as exc:
        return _fail(str(exc), exc.code)
    except KeyboardInterrupt:
        return _fail("interrupted; a submitted job runs on (ganpipe stop ID ends it)", 130)


def _job_ended(job, job_id: str) -> int:
    if str(job.status) == "SUCCEEDED":
        print(f"ganpipe: job {job_id} SUCCEEDED", file=sys.stderr)
        return 0
    return _fail(f"job {job_id} {job.status}: {(job.message or '').strip()}")


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines import jobs

    try:
        submission = jobs.prepare_run(args.config, args.overrides, args.working_dir, args.pip)
    except ConfigError as exc:
        return _fail(f"config: {exc}", 2)
    except jobs.JobsError as exc:
        return _fail(str(exc), exc.code)
    for note in submission.notes:
        print(f"ganpipe: note: {note}", file=sys.stderr)

    def body(client, address: str) -> int:
        job_id = jobs.submit(client, submission)
        print(job_id, flush=True)  # alone on stdout: ID=$(ganpipe submit …) works
        if not args.follow:
            print(f"follow it: ganpipe logs {job_id} --follow --address {address}", file=sys.stderr)
            return 0
        return _job_ended(jobs.follow(client, address, job_id), job_id)

    return _on_cluster(args, body)


def cmd_status(args: argparse.Namespace) -> int:
    from pipelines import jobs

    def body(client, address: str) -> int:
        if args.job_id:
            print(jobs.describe(jobs.info(client, address, args.job_id), args.job_id))
            return 0
        listed = jobs.list_jobs(client)
        for job in listed:
            print(jobs.describe(job, job.submission_id or job.job_id or "-"))
        if not listed:
            print(f"no jobs on the cluster at {address}")
        return 0

    return _on_cluster(args, body)


def cmd_logs(args: argparse.Namespace) -> int:
    from pipelines import jobs

    def body(client, address: str) -> int:
        if args.follow:
            return _job_ended(jobs.follow(client, address, args.job_id), args.job_id)
        sys.stdout.write(jobs.logs(client, address, args.job_id))
        return 0

    return _on_cluster(args, body)


def cmd_stop(args: argparse.Namespace) -> int:
    from pipelines import jobs

    def body(client, address: str) -> int:
        if jobs.stop(client, address, args.job_id):
            print(f"stopping {args.job_id}")
        else:
            job = jobs.info(client, address, args.job_id)
            print(f"{args.job_id} was not running ({job.status})")
        return 0

    return _on_cluster(args, body)


def cmd_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        return _fail(f"config: {exc}", 2)
    flat = config.flat()
    for key, type_name, default, text in describe():
        print(f"{key:28s} {flat[key]!s:16s} ({type_name}, default {default!r}) {text}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from pipelines.steps.default_dag import default_dag
    from pipelines.tracking import pipeline_runs

    config = Config(
        workdir=args.workdir,
        tracking_uri=_tracking_uri(args.workdir, args.tracking_uri),
        experiment=args.experiment,
    )
    steps = default_dag().names
    runs = pipeline_runs(config, args.limit)
    if not runs:
        print(f"no pipeline runs in {config.resolved_tracking_uri} (experiment {args.experiment})")
        return 0
    header = f"{'run id':32s}  {'started':16s}  {'status':8s}  " + "  ".join(steps)
    print(header)
    for run in runs:
        started = datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
        cells = [run.data.tags.get(f"ganpipe.step.{name}", "-").ljust(len(name)) for name in steps]
        print(f"{run.info.run_id:32s}  {started:16s}  {run.info.status:8s}  " + "  ".join(cells))
    return 0


def cmd_dag(args: argparse.Namespace) -> int:
    from pipelines.steps.default_dag import default_dag

    print(default_dag().mermaid())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ganpipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", help="preset name in configs/ or a YAML file")
        p.add_argument("overrides", nargs="*", help="key=value, e.g. train.workers=2")

    for name, fn, text in (
        ("run", cmd_run, "prepare → validate → fit_features → train → evaluate → register"),
        ("tune", cmd_tune, "the same with population-based training (Ray Tune) in place of train"),
    ):
        run = sub.add_parser(name, help=text)
        with_config(run)
        run.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted pipeline run")
        run.add_argument(
            "--force",
            metavar="STEP",
            action="append",
            default=[],
            help="run STEP (and all after it) again even if cached; repeatable",
        )
        run.add_argument("--no-cache", action="store_true", help="run every step again")
        run.set_defaults(fn=fn)

    config = sub.add_parser("config", help="print the resolved config with defaults and docs")
    with_config(config)
    config.set_defaults(fn=cmd_config)

    gen = sub.add_parser("generate", help="sample images from a registered model into a PNG grid")
    gen.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/generator",
    )
    gen.add_argument("-n", default="64", help="number of images (default 64)")
    gen.add_argument("--seed", default="0", help="first seed, >= 0 (default 0)")
    gen.add_argument("--out", default="grid.png", help="PNG file to write (default grid.png)")
    gen.set_defaults(fn=cmd_generate)

    promote = sub.add_parser("promote", help="make a registered model version the champion")
    promote.add_argument("name", help="registered model name")
    promote.add_argument("version", help="model version number")
    promote.set_defaults(fn=cmd_promote)

    ui = sub.add_parser("ui", help="open the MLflow UI on the tracking store")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    ui.set_defaults(fn=cmd_ui)

    server = sub.add_parser(
        "server", help="run an MLflow tracking server (database backend, served artifacts)"
    )
    server.add_argument(
        "--backend-store-uri",
        metavar="URI",
        help="database for runs and models, e.g. postgresql://postgres@127.0.0.1:5432/mlflow "
        "(default: the workdir's SQLite store)",
    )
    server.add_argument(
        "--artifacts-destination",
        metavar="DIR|s3://…",
        help="where the server stores artifacts (default: <workdir>/mlartifacts)",
    )
    server.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    server.add_argument("--port", type=int, default=5000)
    server.add_argument("--workers", type=int, help="server processes (MLflow's default: 4)")
    server.add_argument(
        "--allowed-hosts", metavar="HOSTS", help="Host names clients may use (comma-separated)"
    )
    server.add_argument("--workdir", default=DEFAULT_WORKDIR, help="for the default stores")
    server.set_defaults(fn=cmd_server)

    runs = sub.add_parser("runs", help="list pipeline runs with the status of each step")
    runs.add_argument("--limit", type=int, default=20)
    runs.add_argument("--experiment", default=Config().experiment)
    runs.set_defaults(fn=cmd_runs)

    for p in (gen, promote, ui, runs):
        p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="the run's workdir")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the workdir's store)")

    submit = sub.add_parser("submit", help="run the pipeline as a Ray Job on a Ray cluster")
    submit.add_argument("--config", "-c", "--preset", dest="config", help="as for run")
    submit.add_argument("overrides", nargs="*", help="key=value, as for run")
    submit.add_argument(
        "--follow", action="store_true", help="stream the job's logs; exit 1 unless it succeeds"
    )
    submit.add_argument(
        "--pip",
        action="store_true",
        help="also install the project's dependencies pinned to the versions installed here "
        "(default: use the cluster image's; see docs/deploy.md)",
    )
    submit.add_argument("--working-dir", help="project folder to upload (default: this checkout)")
    submit.set_defaults(fn=cmd_submit)
    status = sub.add_parser("status", help="a submitted job's status (no ID: every job)")
    status.add_argument("job_id", nargs="?", metavar="ID")
    status.set_defaults(fn=cmd_status)
    logs = sub.add_parser("logs", help="a submitted job's logs")
    logs.add_argument("job_id", metavar="ID")
    logs.add_argument("--follow", action="store_true", help="stream until the job ends")
    logs.set_defaults(fn=cmd_logs)
    stop = sub.add_parser("stop", help="stop a submitted job")
    stop.add_argument("job_id", metavar="ID")
    stop.set_defaults(fn=cmd_stop)
    for p in (submit, status, logs, stop):
        p.add_argument(
            "--address",
            help="Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, else "
            "http://127.0.0.1:8265); token from $RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH",
        )

    dag = sub.add_parser("dag", help="print the pipeline DAG as Mermaid text")
    dag.set_defaults(fn=cmd_dag)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
