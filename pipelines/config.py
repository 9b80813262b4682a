"""The one config schema: every key, its type, its default and what it means.

Presets (YAML files in ``configs/``) override a few keys; ``key=value`` arguments override a
preset. Unknown keys, wrong types and impossible values are refused here, before any Ray work.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gan.augment import AUGMENTATIONS, parse_kinds
from gan.data import ON_BAD, detect_format
from gan.losses import LOSSES
from gan.nn.models import check_resolution
from gan.nn.normalization import DISCRIMINATOR_NORMALIZATIONS, GENERATOR_NORMALIZATIONS
from gan.optim import OPTIMIZERS
from gan.schedules import DECAYS, WARMUPS, SchedulePolicy

PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"
SAMPLING_MODES = ("eval", "train")
PRECISIONS = ("fp32", "bf16")
MUTABLE = ("lr_g", "lr_d", "beta1", "d_steps")  # what population-based training can adapt


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key and what is allowed."""


def doc(text: str, default: Any) -> Any:
    return field(default=default, metadata={"doc": text})


@dataclass
class DataConfig:
    source: str = doc(
        "'digits' (scikit-learn's, bundled) or a path: .npz file, MNIST IDX folder, CIFAR-10 "
        "python folder, Parquet file or folder, image folder (one sub-folder per class)",
        "digits",
    )
    on_bad: str = doc(
        "unreadable images or empty class folders: fail (stop, naming them) or skip (leave "
        "them out, listed in the prepare step's skipped_files.json)",
        "fail",
    )
    resolution: int = doc("image side in pixels; a power of two from 8 to 256", 16)
    holdout_fraction: float = doc("share of images held out for evaluation, in (0, 1)", 0.2)
    shards: int = doc("Parquet shards of the training split; at least train.workers", 4)
    seed: int = doc("seed of the train/held-out split and the shard shuffle", 0)


@dataclass
class ModelConfig:
    latent_dim: int = doc("size of the generator's input noise", 64)
    g_width: int = doc("generator channels at the last upsampling (doubling towards 4×4)", 32)
    d_width: int = doc("discriminator channels at the first layer (doubling per layer)", 32)
    g_norm: str = doc(
        f"generator normalization: {', '.join(GENERATOR_NORMALIZATIONS)}", "sync_batch"
    )
    d_norm: str = doc(
        f"discriminator normalization: {', '.join(DISCRIMINATOR_NORMALIZATIONS)} (spectral: "
        "the best of the study in docs/studies.md)",
        "spectral",
    )
    g_output_norm: bool = doc("normalize G's last hidden layer's output too (DCGAN: no)", False)
    d_input_norm: bool = doc("normalize after D's first convolution (DCGAN: no)", False)
    conditional: bool = doc(
        "class-conditional G (label embedding concatenated to z) and D (projection); the "
        "registered model then takes a label per seed",
        False,
    )


@dataclass
class OptimConfig:
    lr_g: float = doc("generator learning rate (peak, after warm-up)", 2e-4)
    lr_d: float = doc("discriminator learning rate (peak, after warm-up)", 2e-4)
    g_optimizer: str = doc(f"generator optimizer: {', '.join(OPTIMIZERS)}", "adam")
    d_optimizer: str = doc(f"discriminator optimizer: {', '.join(OPTIMIZERS)}", "adam")
    beta1: float = doc("Adam/AdamW beta1 for both networks (DCGAN: 0.5)", 0.5)
    beta2: float = doc("Adam/AdamW beta2 for both networks", 0.999)
    momentum: float = doc("SGD/RMSprop momentum for both networks", 0.9)
    weight_decay: float = doc("weight decay for both networks (AdamW: decoupled)", 0.0)
    warmup: str = doc(f"warm-up shape: {', '.join(WARMUPS)}", "linear")
    warmup_steps: int = doc("warm-up steps, ending at the peak rate", 100)
    warmup_start_factor: float = doc(
        "exponential warm-up starts at this fraction of the peak", 0.01
    )
    decay: str = doc(
        f"policy after warm-up: {', '.join(DECAYS)} (plateau: driven by the in-training "
        "evaluation distance, needs train.eval_every)",
        "cosine",
    )
    min_lr_factor: float = doc("floor of every decay, as a fraction of the peak rate", 0.1)
    gamma: float = doc("step decay: multiply the rate by gamma every step_size steps", 0.5)
    step_size: int = doc("step decay: steps between two multiplications by gamma", 1000)
    cycle_low: float = doc("cyclic policies: the low rate as a fraction of the peak", 0.1)
    cycle_half_steps: int = doc("cyclic policies: steps from the low to the high rate", 500)
    plateau_factor: float = doc("plateau: multiply the rate by this on a plateau", 0.5)
    plateau_patience: int = doc(
        "plateau: evaluations without improvement tolerated before a reduction", 2
    )
    plateau_threshold: float = doc(
        "plateau: relative improvement of the distance that counts as one", 0.01
    )
    plateau_cooldown: int = doc("plateau: evaluations after a reduction that do not count", 0)


@dataclass
class LossConfig:
    kind: str = doc(f"GAN loss: {', '.join(LOSSES)}", "hinge")
    gp_weight: float = doc("WGAN-GP gradient penalty weight (0: off; 10 with wasserstein)", 0.0)
    r1_gamma: float = doc("R1 penalty weight on real images (0: off)", 0.0)
    r1_interval: int = doc("apply R1 every this many D updates (lazy regularization)", 16)
    d_steps: int = doc("discriminator updates per generator update", 1)
    lecam_weight: float = doc(
        "LeCam regularization weight on D (0: off; small-data GANs use about 0.3)", 0.0
    )
    consistency_weight: float = doc(
        "consistency regularization (bCR) weight on D's reals, (D(x) - D(augmented x))^2 "
        "(0: off; needs augment.kinds)",
        0.0,
    )


@dataclass
class AugmentConfig:
    kinds: str = doc(
        "differentiable augmentation of every image D sees (DiffAugment): comma-separated "
        f"subset of {', '.join(AUGMENTATIONS)}; empty: none. color applies to 3-channel data "
        "only (the channels are known after prepare): other batches pass it unchanged",
        "",
    )
    adaptive: bool = doc("tune p during training from D's overfitting signal (ADA)", False)
    p: float = doc(
        "probability of each op per image: fixed, or the starting value when adaptive "
        "(ADA starts at 0)",
        1.0,
    )
    target: float = doc(
        "adaptive: p rises while E[sign D(real)] over an interval is above this (ADA: 0.6)", 0.6
    )
    adjust_speed: int = doc(
        "adaptive: images over which p can go from 0 to 1. ADA uses 500k for runs of tens of "
        "millions of images; 20k is about 310 steps of batch 64, a sixth of the default run",
        20_000,
    )
    interval: int = doc("adaptive: steps between two adjustments of p", 4)


@dataclass
class EmaConfig:
    enabled: bool = doc("keep an exponential moving average of G; evaluate and register it", False)
    decay: float = doc("EMA decay per step", 0.999)
    start_step: int = doc("copy G's weights until this step, then average", 0)


@dataclass
class TrainConfig:
    workers: int = doc("Ray Train data-parallel workers (CPU processes here, GPUs on a cluster)", 2)
    use_gpu: bool = doc("one GPU per worker (NCCL) instead of CPU (gloo)", False)
    steps: int = doc("training iterations (one D and one G update each)", 2000)
    batch_size: int = doc("global batch; each worker takes batch_size / workers", 64)
    threads_per_worker: int = doc("torch intra-op threads in each worker", 1)
    report_every: int = doc("steps between metric reports (and MLflow points)", 50)
    report_seconds: float = doc(
        "seconds between the workers' reports to Ray Train, each carrying the report_every "
        "windows since the last (a report stops every worker until Ray Train takes it); also "
        "at the first window, every checkpoint and the end; 0: one report per window",
        5.0,
    )
    checkpoint_every: int = doc("steps between checkpoints written through Ray Train", 500)
    seed: int = doc("seed of weights and noise", 0)
    eval_every: int = doc(
        "steps between in-training evaluation distances and sample grids (0: off); a "
        "multiple of report_every",
        250,
    )
    eval_samples: int = doc("generated images behind each in-training evaluation distance", 500)
    freeze_g_stats_in_d_phase: bool = doc(
        "G's batch-norm running statistics are not updated by the fakes made for D", False
    )
    reuse_fakes: bool = doc(
        "the G update trains on the fakes of the last D update instead of a fresh batch: one G "
        "forward a step instead of two (and with model.g_norm=sync_batch two fewer exchanges "
        "between workers per norm layer); excludes freeze_g_stats_in_d_phase",
        True,
    )
    max_failures: int = doc(
        "restarts of the worker group after a worker dies, each from the latest checkpoint "
        "(Ray Train's FailureConfig; -1: no limit)",
        2,
    )
    nan_rollbacks: int = doc(
        "rollbacks to the last checkpoint when a loss or weight stops being finite (checked "
        "every report_every steps); the next divergence ends training with an error",
        3,
    )
    rollback_lr_factor: float = doc(
        "both learning rates are multiplied by this at every rollback, in (0, 1]", 0.5
    )


@dataclass
class PerfConfig:
    precision: str = doc(
        "arithmetic of G's and D's forward passes: fp32, or bf16 (autocast: convolutions in "
        "bfloat16; losses, gradients and optimizer states stay float32)",
        "fp32",
    )
    channels_last: bool = doc(
        "NHWC memory layout for the networks and the batches (tensor-core GPUs convolve faster)",
        False,
    )
    compile: bool = doc(
        "torch.compile G and D (the first steps of a worker compile them: tens of seconds). "
        "Measured on 2 CPU cores: 1.08x faster with 1 worker, 0.94x with 2 workers and sync "
        "batch norm, whose exchanges split the compiled graph (docs/benchmarks.md)",
        False,
    )
    fused_optimizer: bool = doc(
        "fused Adam/AdamW: one kernel updates every parameter (optim.*_optimizer adam or adamw)",
        False,
    )
    pin_memory: bool = doc(
        "copy batches to the GPU through two pinned buffers of the worker's own (needs "
        "train.use_gpu); without it they go through torch's caching host allocator, also "
        "pinned and without blocking",
        False,
    )
    keep_freed_memory: bool = doc(
        "glibc only: fixed malloc settings in each training worker, so that memory freed in "
        "one step is reused by the next instead of being handed back to the kernel and faulted "
        "in again (gan.host_memory; 6 % of a 1-worker CPU step's images/s on 2 cores, "
        "docs/benchmarks.md)",
        True,
    )


@dataclass
class EvalConfig:
    samples: int = doc("generated images scored against the held-out split", 1000)
    classifier_epochs: int = doc("epochs of the feature-extractor classifier", 15)
    grid_size: int = doc("images in the logged sample grid (a square number)", 64)
    sampling_mode: str = doc(
        "batch norm when sampling from the trained G: eval (running statistics) or train "
        "(statistics of each requested batch); evaluated and registered the same way",
        "eval",
    )
    inception_weights: str = doc(
        "local file of the FID Inception-v3 weights (pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth): also report the classic FID as fid_inception "
        "(about 0.3 s per image on CPU); empty: off",
        "",
    )
    standing_stats_batches: int = doc(
        "before evaluating, recompute G's running batch-norm statistics over this many "
        "batches of its own samples (0: keep those from training)",
        0,
    )


@dataclass
class PopulationConfig:
    population: int = doc("trials trained at once under population-based training", 4)
    perturbation_interval: int = doc(
        "steps between exploit/explore decisions; a multiple of train.eval_every", 500
    )
    quantile_fraction: float = doc(
        "share of trials in the bottom (cloned from) and top (cloned) groups", 0.25
    )
    resample_probability: float = doc(
        "chance that an explored value is drawn anew from its range instead of perturbed", 0.25
    )
    perturb_up: float = doc("explore: multiply a value by this ...", 1.2)
    perturb_down: float = doc("... or by this", 0.8)
    mutate: str = doc(
        f"comma-separated hyper-parameters PBT adapts: {', '.join(MUTABLE)}", "lr_g,lr_d"
    )
    lr_min: float = doc("learning rates: low end of the log-uniform range (initial draws)", 2e-5)
    lr_max: float = doc("learning rates: high end of the log-uniform range", 2e-3)
    beta1_min: float = doc("Adam beta1 (when mutated): low end of its range", 0.0)
    beta1_max: float = doc("Adam beta1 (when mutated): high end of its range", 0.9)
    d_steps_max: int = doc("D updates per G update (when mutated): the largest value", 3)
    synchronous: bool = doc(
        "wait for every trial at each perturbation point, then exploit (deterministic ranking; "
        "the fastest trial idles)",
        False,
    )
    seed: int = doc("seed of the initial draws", 0)
    max_failures: int = doc("restarts of a crashed trial from its last checkpoint", 1)


@dataclass
class RegisterConfig:
    model_name: str = doc("registered model name in the MLflow registry", "ganpipe-digits")


@dataclass
class StorageConfig:
    s3_endpoint_url: str = doc(
        "endpoint of an S3-compatible store (MinIO, Ceph, moto: http://host:port) for every "
        "s3:// URI, boto3, pyarrow and MLflow alike; empty: $AWS_ENDPOINT_URL_S3, "
        "$AWS_ENDPOINT_URL, else AWS. Credentials and region always come from the AWS chain "
        "(environment, ~/.aws, instance role), never from the config",
        "",
    )
    artifact_uri: str = doc(
        "where new MLflow experiments keep their artifacts (models, grids, checkpoints): a "
        "path or s3://bucket/prefix; empty: <workdir>/mlartifacts without a tracking server, "
        "the server's choice with one. Read when the experiment is created",
        "",
    )
    local_dir: str = doc(
        "local folder of a workdir on S3: step outputs are staged here before upload, inputs "
        "cached, and the embedded MLflow store (mlflow.db) kept; empty: "
        "~/.cache/ganpipe/<bucket>/<prefix>",
        "",
    )


@dataclass
class Config:
    workdir: str = doc(
        "folder or s3://bucket/prefix for step outputs (prepared shards, checkpoints), and "
        "locally for the embedded MLflow store",
        "ganpipe-runs",
    )
    tracking_uri: str = doc(
        "MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else a SQLite store inside workdir", ""
    )
    experiment: str = doc("MLflow experiment of pipeline runs", "ganpipe")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    tune: PopulationConfig = field(default_factory=PopulationConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"train.workers": 2, ...}``: the form logged as MLflow params."""
        return dict(_flatten(self.to_dict()))

    @property
    def resolved_tracking_uri(self) -> str:
        """``tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else the workdir's SQLite."""
        if self.tracking_uri:
            return self.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{self.resolved_local_dir / 'mlflow.db'}"

    @property
    def resolved_local_dir(self) -> Path:
        """The local folder: the workdir itself, or for a workdir on S3 ``storage.local_dir``
        (else a folder per bucket and prefix under ~/.cache/ganpipe)."""
        if not is_s3_uri(self.workdir):
            return Path(self.workdir.removeprefix("file://")).resolve()
        if self.storage.local_dir:
            return Path(self.storage.local_dir).expanduser().resolve()
        return Path.home() / ".cache" / "ganpipe" / self.workdir[len("s3://") :].strip("/")

    @property
    def resolved_artifact_uri(self) -> str | None:
        """The artifact location of a new experiment; None: the tracking server decides."""
        if self.storage.artifact_uri:
            return self.storage.artifact_uri
        uri = self.resolved_tracking_uri
        if uri.startswith(("http://", "https://")):
            return None
        if is_s3_uri(self.workdir):
            return self.workdir.rstrip("/") + "/mlartifacts"
        return (self.resolved_local_dir / "mlartifacts").as_uri()


def is_s3_uri(text: str) -> bool:
    return text.startswith("s3://")


def _check_location(key: str, value: str) -> None:
    """A path, file:// or s3://bucket[/prefix] URI; credentials inside it are refused."""
    if "://" not in value or value.startswith("file://"):
        return
    _require(
        is_s3_uri(value),
        f"{key}={value!r}: unsupported scheme; use a path, file://PATH or s3://BUCKET/PREFIX",
    )
    bucket = value[len("s3://") :].split("/", 1)[0]
    _require(
        "@" not in bucket and ":" not in bucket,
        f"{key}: credentials do not belong in a URI (it is logged); give them through the AWS "
        "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)",
    )
    _require(
        re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket) is not None,
        f"{key}={value!r}: {bucket!r} is not an S3 bucket name (3-63 lower-case letters, "
        "digits, '.', '-'); expected s3://BUCKET/PREFIX",
    )


def _validate_storage(c: Config) -> None:
    s = c.storage
    _check_location("workdir", c.workdir)
    _check_location("storage.artifact_uri", s.artifact_uri)
    _check_location("data.source", c.data.source)
    if s.s3_endpoint_url:
        match = re.fullmatch(r"https?://([^/@]+)/?", s.s3_endpoint_url)
        _require(
            "@" not in s.s3_endpoint_url,
            "storage.s3_endpoint_url: credentials do not belong in a URL (it is logged); give "
            "them through the AWS environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE or an instance role)",
        )
        _require(
            match is not None,
            f"storage.s3_endpoint_url={s.s3_endpoint_url!r}: expected http(s)://HOST[:PORT]",
        )
    _require(
        not s.local_dir or "://" not in s.local_dir,
        f"storage.local_dir={s.local_dir!r} must be a local folder",
    )


def _flatten(d: dict[str, Any], prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def describe() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) of every key: the table printed by ``ganpipe config``."""
    rows = []
    for f in dataclasses.fields(Config):
        if f.name in _SECTIONS:
            for sf in dataclasses.fields(_SECTIONS[f.name]):
                rows.append((f"{f.name}.{sf.name}", str(sf.type), sf.default, sf.metadata["doc"]))
        else:
            rows.append((f.name, str(f.type), f.default, f.metadata["doc"]))
    return rows


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "loss": LossConfig,
    "augment": AugmentConfig,
    "ema": EmaConfig,
    "train": TrainConfig,
    "perf": PerfConfig,
    "eval": EvalConfig,
    "register": RegisterConfig,
    "tune": PopulationConfig,
    "storage": StorageConfig,
}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _coerce(key: str, type_name: str, value: Any) -> Any:
    expected = _TYPES[type_name]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, bool) and expected is not bool:
        raise ConfigError(f"{key}: expected {type_name}, got boolean {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"{key}: expected {type_name}, got {type(value).__name__} {value!r}")
    return value


def _set(config: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    target: Any = config
    fields_here = {f.name: f for f in dataclasses.fields(Config)}
    for depth, part in enumerate(parts):
        if part not in fields_here:
            where = ".".join(parts[:depth]) or "top level"
            allowed = ", ".join(sorted(fields_here))
            raise ConfigError(f"unknown key {key!r}: no {part!r} at {where}; allowed: {allowed}")
        f = fields_here[part]
        if part in _SECTIONS and depth == 0:
            if depth == len(parts) - 1:
                if not isinstance(value, dict):
                    raise ConfigError(f"{key}: expected a mapping of {part}.* keys")
                for sub_key, sub_value in value.items():
                    _set(config, f"{part}.{sub_key}", sub_value)
                return
            target = getattr(target, part)
            fields_here = {sf.name: sf for sf in dataclasses.fields(_SECTIONS[part])}
            continue
        if depth != len(parts) - 1:
            raise ConfigError(f"unknown key {key!r}: {'.'.join(parts[: depth + 1])} has no keys")
        setattr(target, part, _coerce(key, str(f.type), value))


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr_g=1e-4"`` -> ``("optim.lr_g", 1e-4)``; values are read as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.workers=2)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot read value {raw!r}: {exc}") from None
    # YAML 1.1 reads "1e-4" as a string; users mean a number.
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        value = float(value)
    return key.strip(), value


def preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path!r} does not exist")
        return path
    candidate = PRESETS_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(
            f"unknown preset {name_or_path!r}; presets: {', '.join(names)} (or a .yaml path)"
        )
    return candidate


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the preset (a name in configs/ or a YAML path), then key=value overrides."""
    config = Config()
    if preset:
        path = preset_path(preset)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
        for key, value in values.items():
            _set(config, key, value)
    for text in overrides:
        _set(config, *parse_override(text))
    validate(config)
    return config


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(c: Config) -> None:
    """Refuse values the pipeline cannot run with; each message names the key and the range."""
    try:
        check_resolution(c.data.resolution)
    except ValueError as exc:
        raise ConfigError(f"data.resolution: {exc}") from None
    _require(0 < c.data.holdout_fraction < 1, "data.holdout_fraction must be in (0, 1)")
    _require(c.data.shards >= 1, "data.shards must be >= 1")
    _require(c.model.latent_dim >= 1, "model.latent_dim must be >= 1")
    _require(c.model.g_width >= 1 and c.model.d_width >= 1, "model.g_width/d_width must be >= 1")
    for key, allowed in (
        ("g_norm", GENERATOR_NORMALIZATIONS),
        ("d_norm", DISCRIMINATOR_NORMALIZATIONS),
    ):
        value = getattr(c.model, key)
        _require(
            value in allowed,
            f"model.{key}: unknown normalization {value!r}; allowed: {', '.join(allowed)}",
        )
    for key in ("lr_g", "lr_d"):
        value = getattr(c.optim, key)
        _require(value > 0, f"optim.{key} must be > 0 (a learning rate), got {value}")
    for key in ("beta1", "beta2"):
        value = getattr(c.optim, key)
        _require(0 <= value < 1, f"optim.{key} must be in [0, 1), got {value}")
    _require(
        0 <= c.optim.warmup_steps < c.train.steps,
        f"optim.warmup_steps ({c.optim.warmup_steps}) must be >= 0 and below train.steps "
        f"({c.train.steps})",
    )
    for key in ("g_optimizer", "d_optimizer"):
        value = getattr(c.optim, key)
        _require(
            value in OPTIMIZERS,
            f"optim.{key}: unknown optimizer {value!r}; allowed: {', '.join(OPTIMIZERS)}",
        )
    _require(c.optim.momentum >= 0, "optim.momentum must be >= 0")
    _require(c.optim.weight_decay >= 0, "optim.weight_decay must be >= 0")
    _require(
        c.optim.warmup in WARMUPS,
        f"optim.warmup: unknown {c.optim.warmup!r}; allowed: {', '.join(WARMUPS)}",
    )
    _require(
        c.optim.decay in DECAYS,
        f"optim.decay: unknown {c.optim.decay!r}; allowed: {', '.join(DECAYS)}",
    )
    _require(
        c.optim.decay != "plateau" or c.train.eval_every > 0,
        "optim.decay=plateau reduces the rate when the in-training evaluation distance stalls: "
        "set train.eval_every (e.g. 250)",
    )
    _require(0 < c.optim.min_lr_factor <= 1, "optim.min_lr_factor must be in (0, 1]")
    try:
        schedule_policy(c)
    except ValueError as exc:
        raise ConfigError(f"optim: {exc}") from None
    _validate_loss(c)
    _validate_augment(c)
    _validate_perf(c)
    t = c.train
    _require(t.workers >= 1, f"train.workers must be >= 1, got {t.workers}")
    _require(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    _require(
        t.batch_size >= t.workers and t.batch_size % t.workers == 0,
        f"train.batch_size ({t.batch_size}) must be a positive multiple of train.workers "
        f"({t.workers}) so every worker gets an equal share",
    )
    _require(
        t.batch_size // t.workers >= 2,
        "train.batch_size / train.workers must be >= 2: batch norm needs two images per worker",
    )
    _require(t.threads_per_worker >= 1, "train.threads_per_worker must be >= 1")
    _require(t.report_every >= 1, "train.report_every must be >= 1")
    _require(t.checkpoint_every >= 1, "train.checkpoint_every must be >= 1")
    _require(t.report_seconds >= 0, f"train.report_seconds must be >= 0, got {t.report_seconds}")
    _require(t.max_failures >= -1, f"train.max_failures must be >= -1, got {t.max_failures}")
    _require(t.nan_rollbacks >= 0, f"train.nan_rollbacks must be >= 0, got {t.nan_rollbacks}")
    _require(
        0 < t.rollback_lr_factor <= 1,
        f"train.rollback_lr_factor must be in (0, 1], got {t.rollback_lr_factor}",
    )
    _require(
        t.eval_every >= 0 and t.eval_every % t.report_every == 0,
        f"train.eval_every ({t.eval_every}) must be 0 (off) or a multiple of train.report_every "
        f"({t.report_every}): the distance travels with a report",
    )
    _require(t.eval_samples >= 2, "train.eval_samples must be >= 2")
    _require(
        not (t.reuse_fakes and t.freeze_g_stats_in_d_phase),
        "train.reuse_fakes and train.freeze_g_stats_in_d_phase exclude each other: with reused "
        "fakes G makes one batch a step, for both updates; set one of them to false",
    )
    _require(
        c.data.shards >= t.workers,
        f"data.shards ({c.data.shards}) must be >= train.workers ({t.workers}): "
        "each worker reads its own shards",
    )
    _require(c.eval.samples >= 2, "eval.samples must be >= 2")
    _require(c.eval.classifier_epochs >= 1, "eval.classifier_epochs must be >= 1")
    _require(
        c.eval.sampling_mode in SAMPLING_MODES,
        f"eval.sampling_mode: unknown {c.eval.sampling_mode!r}; allowed: "
        f"{', '.join(SAMPLING_MODES)}",
    )
    _require(c.eval.standing_stats_batches >= 0, "eval.standing_stats_batches must be >= 0")
    _require(
        not c.eval.inception_weights or Path(c.eval.inception_weights).is_file(),
        f"eval.inception_weights: no such file {c.eval.inception_weights!r} (it is never "
        "downloaded: copy pytorch-fid's pt_inception-2015-12-05-6726825d.pth there, or leave the "
        "key empty)",
    )
    side = int(round(c.eval.grid_size**0.5))
    _require(
        c.eval.grid_size >= 1 and side * side == c.eval.grid_size,
        f"eval.grid_size must be a square number (e.g. 64), got {c.eval.grid_size}",
    )
    _require(
        re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", c.register.model_name) is not None,
        f"register.model_name {c.register.model_name!r}: use letters, digits, '_', '.', '-'",
    )
    _validate_population(c)
    _require(bool(c.workdir), "workdir must not be empty")
    _require(bool(c.experiment), "experiment must not be empty")
    _validate_storage(c)
    _require(
        c.data.on_bad in ON_BAD,
        f"data.on_bad: unknown {c.data.on_bad!r}; allowed: {', '.join(ON_BAD)}",
    )
    try:
        if not is_s3_uri(c.data.source):  # on S3: checked at startup (storage.check_storage)
            detect_format(c.data.source)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def mutated(c: Config) -> list[str]:
    return [name.strip() for name in c.tune.mutate.split(",") if name.strip()]


def validate_population(c: Config) -> None:
    """What population-based training needs beyond a valid config (``ganpipe tune`` checks it
    before Ray starts): trials ranked by the evaluation distance at every perturbation."""
    p = c.tune
    _require(
        c.train.eval_every > 0 and p.perturbation_interval % c.train.eval_every == 0,
        f"tune.perturbation_interval ({p.perturbation_interval}) must be a multiple of "
        f"train.eval_every ({c.train.eval_every}, not 0): PBT ranks trials by the evaluation "
        "distance measured there",
    )
    _require(
        p.perturbation_interval < c.train.steps,
        f"tune.perturbation_interval ({p.perturbation_interval}) must be below train.steps "
        f"({c.train.steps}), or no trial is ever exploited",
    )


def _validate_population(c: Config) -> None:
    p = c.tune
    _require(p.population >= 2, f"tune.population must be >= 2 (a population), got {p.population}")
    _require(p.perturbation_interval > 0, "tune.perturbation_interval must be > 0")
    _require(0 < p.quantile_fraction <= 0.5, "tune.quantile_fraction must be in (0, 0.5]")
    _require(0 <= p.resample_probability <= 1, "tune.resample_probability must be in [0, 1]")
    _require(p.perturb_up > 1 > p.perturb_down > 0, "tune: need perturb_up > 1 > perturb_down > 0")
    names = mutated(c)
    unknown = [n for n in names if n not in MUTABLE]
    _require(
        bool(names) and not unknown,
        f"tune.mutate: unknown {', '.join(unknown) or 'empty list'}; allowed: {', '.join(MUTABLE)}",
    )
    _require(0 < p.lr_min < p.lr_max, "tune: need 0 < lr_min < lr_max")
    _require(0 <= p.beta1_min < p.beta1_max < 1, "tune: need 0 <= beta1_min < beta1_max < 1")
    _require(p.d_steps_max >= 1, "tune.d_steps_max must be >= 1")
    _require(p.max_failures >= 0, "tune.max_failures must be >= 0")


def _validate_loss(c: Config) -> None:
    loss, ema = c.loss, c.ema
    _require(loss.kind in LOSSES, f"loss.kind: unknown {loss.kind!r}; allowed: {', '.join(LOSSES)}")
    _require(loss.gp_weight >= 0, "loss.gp_weight must be >= 0")
    _require(loss.r1_gamma >= 0, "loss.r1_gamma must be >= 0")
    _require(loss.r1_interval >= 1, "loss.r1_interval must be >= 1")
    _require(loss.d_steps >= 1, "loss.d_steps must be >= 1")
    penalties = loss.gp_weight > 0 or loss.r1_gamma > 0
    _require(
        not (penalties and c.model.d_norm in ("batch", "sync_batch")),
        "loss.gp_weight / loss.r1_gamma: gradient penalties are ill-defined with batch norm in D "
        f"(model.d_norm={c.model.d_norm}); use model.d_norm=spectral or none",
    )
    _require(
        not (loss.kind == "wasserstein" and loss.gp_weight == 0),
        "loss.kind=wasserstein needs a Lipschitz constraint: set loss.gp_weight (e.g. 10)",
    )
    _require(0 < ema.decay < 1, f"ema.decay must be in (0, 1), got {ema.decay}")
    _require(ema.start_step >= 0, "ema.start_step must be >= 0")


def _validate_perf(c: Config) -> None:
    p = c.perf
    _require(
        p.precision in PRECISIONS,
        f"perf.precision: unknown {p.precision!r}; allowed: {', '.join(PRECISIONS)}",
    )
    not_adam = [
        f"optim.{key}={getattr(c.optim, key)}"
        for key in ("g_optimizer", "d_optimizer")
        if getattr(c.optim, key) not in ("adam", "adamw")
    ]
    _require(
        not (p.fused_optimizer and not_adam),
        f"perf.fused_optimizer has fused kernels for adam and adamw only ({', '.join(not_adam)}): "
        "switch those optimizers or set perf.fused_optimizer=false",
    )
    _require(
        not (p.compile and p.channels_last),
        "perf.compile with perf.channels_last: torch's compiler miscompiles the backward pass of "
        "G's first transposed convolution in NHWC layout (seen on an H200, torch 2.11): turn one "
        "of them off",
    )
    _require(
        not (p.pin_memory and not c.train.use_gpu),
        "perf.pin_memory speeds up copies from host to GPU memory: set train.use_gpu=true, or "
        "perf.pin_memory=false on CPU",
    )


def _validate_augment(c: Config) -> None:
    a, loss = c.augment, c.loss
    try:
        kinds = parse_kinds(a.kinds)
    except ValueError as exc:
        raise ConfigError(f"augment.kinds: {exc}") from None
    _require(0 <= a.p <= 1, f"augment.p must be in [0, 1], got {a.p}")
    _require(
        -1 < a.target < 1, f"augment.target is a mean of signs: must be in (-1, 1), got {a.target}"
    )
    _require(a.adjust_speed >= 1, f"augment.adjust_speed must be >= 1, got {a.adjust_speed}")
    _require(a.interval >= 1, f"augment.interval must be >= 1, got {a.interval}")
    _require(
        not (a.adaptive and not kinds),
        "augment.adaptive tunes the probability of augmentations: set augment.kinds "
        f"(e.g. translation,cutout; allowed: {', '.join(AUGMENTATIONS)})",
    )
    _require(loss.lecam_weight >= 0, f"loss.lecam_weight must be >= 0, got {loss.lecam_weight}")
    _require(
        loss.consistency_weight >= 0,
        f"loss.consistency_weight must be >= 0, got {loss.consistency_weight}",
    )
    _require(
        not (loss.consistency_weight > 0 and not kinds),
        "loss.consistency_weight compares D on an image and its augmentation: set augment.kinds "
        f"(e.g. translation,cutout; allowed: {', '.join(AUGMENTATIONS)})",
    )


def schedule_policy(config: Config) -> SchedulePolicy:
    """The learning-rate policy of both networks (each scales its own peak rate)."""
    o = config.optim
    return SchedulePolicy(
        total_steps=config.train.steps,
        warmup=o.warmup,
        warmup_steps=o.warmup_steps,
        warmup_start_factor=o.warmup_start_factor,
        decay=o.decay,
        min_factor=o.min_lr_factor,
        gamma=o.gamma,
        step_size=o.step_size,
        cycle_low=o.cycle_low,
        cycle_half_steps=o.cycle_half_steps,
        plateau_factor=o.plateau_factor,
        plateau_patience=o.plateau_patience,
        plateau_threshold=o.plateau_threshold,
        plateau_cooldown=o.plateau_cooldown,
    )


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` (how it travels into Ray tasks and workers)."""
    config = Config()
    for key, value in _flatten(values):
        _set(config, key, value)
    validate(config)
    return config
