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

from pipelines.config import Config, ConfigError, describe, load_config

DEFAULT_WORKDIR = Config().workdir


def _fail(message: str, code: int = 1) -> int:
    print(f"ganpipe: error: {message}", file=sys.stderr)
    return code


def _tracking_uri(workdir: str, tracking_uri: str | None) -> str:
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return Config(workdir=workdir).resolved_tracking_uri


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
    from pipelines.steps.default_dag import default_dag

    dag = default_dag()
    try:
        config = load_config(args.config, args.overrides)
        unknown = [name for name in args.force if name not in dag.names]
        if unknown:
            raise ConfigError(f"--force {unknown[0]}: no such step; steps: {', '.join(dag.names)}")
        if args.resume:
            config = _resumed_config(config, args)
    except ConfigError as exc:
        return _fail(f"config: {exc}", 2)
    from pipelines.storage import check_writable

    try:
        check_writable(config.workdir)
    except PermissionError as exc:
        return _fail(str(exc), 2)

    from pipelines.runner import StepFailed, run_pipeline

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


def cmd_generate(args: argparse.Namespace) -> int:
    if args.n < 1:
        return _fail(f"-n must be >= 1, got {args.n}", 2)
    import mlflow
    import pandas as pd
    import torch

    from pipelines.steps.evaluate import save_grid

    mlflow.set_tracking_uri(_tracking_uri(args.workdir, args.tracking_uri))
    try:
        model = mlflow.pyfunc.load_model(args.model)
    except Exception as exc:  # MlflowException and friends: the message says what is missing
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _fail(
            f"cannot load model {args.model!r}: {first_line}\n"
            f"(tracking store: {mlflow.get_tracking_uri()}; list models in the MLflow UI)"
        )
    images = model.predict(pd.DataFrame({"seed": range(args.seed, args.seed + args.n)}))
    chw = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(chw, out)
    print(f"wrote {len(images)} images to {out}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    uri = _tracking_uri(args.workdir, args.tracking_uri)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    command += ["--host", args.host, "--port", str(args.port)]
    print(f"MLflow UI on http://{args.host}:{args.port} ({shlex.join(command[1:])})", flush=True)
    os.execv(command[0], command)
    return 0  # not reached


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

    run = sub.add_parser("run", help="prepare → validate → train → evaluate → register")
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
    run.set_defaults(fn=cmd_run)

    config = sub.add_parser("config", help="print the resolved config with defaults and docs")
    with_config(config)
    config.set_defaults(fn=cmd_config)

    gen = sub.add_parser("generate", help="sample images from a registered model into a PNG grid")
    gen.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION")
    gen.add_argument("-n", type=int, default=64, help="number of images (default 64)")
    gen.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    gen.add_argument("--out", default="grid.png", help="PNG file to write (default grid.png)")
    gen.set_defaults(fn=cmd_generate)

    ui = sub.add_parser("ui", help="open the MLflow UI on the tracking store")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    ui.set_defaults(fn=cmd_ui)

    runs = sub.add_parser("runs", help="list pipeline runs with the status of each step")
    runs.add_argument("--limit", type=int, default=20)
    runs.add_argument("--experiment", default=Config().experiment)
    runs.set_defaults(fn=cmd_runs)

    for p in (gen, ui, runs):
        p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="the run's workdir")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the workdir's store)")

    dag = sub.add_parser("dag", help="print the pipeline DAG as Mermaid text")
    dag.set_defaults(fn=cmd_dag)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
