import subprocess
import sys

import pytest

from pipelines.config import Config, ConfigError, config_from_dict, describe, load_config


def test_defaults_are_valid_and_documented():
    config = load_config()
    assert config == Config()
    rows = describe()
    assert {key for key, *_ in rows} == set(config.flat())
    assert all(text for *_, text in rows), "every key needs a doc string"


def test_presets_and_overrides_apply_in_order():
    config = load_config("smoke", ["train.workers=1", "optim.lr_g=1e-4", "model.g_norm=batch"])
    assert config.train.steps == 30  # from the preset
    assert config.train.workers == 1
    assert config.optim.lr_g == pytest.approx(1e-4)
    assert isinstance(config.optim.lr_g, float)
    assert config.model.g_norm == "batch"


def test_optimizer_and_policy_keys_reach_the_schedule():
    from pipelines.config import schedule_policy

    config = load_config(
        "smoke",
        ["optim.g_optimizer=sgd", "optim.decay=cyclic_triangular", "optim.cycle_half_steps=7",
         "optim.warmup=exponential", "optim.warmup_steps=3"],
    )  # fmt: skip
    policy = schedule_policy(config)
    assert (policy.decay, policy.cycle_half_steps, policy.warmup) == ("cyclic_triangular", 7,
                                                                      "exponential")  # fmt: skip
    assert policy.total_steps == config.train.steps
    assert config.optim.g_optimizer == "sgd" and config.optim.d_optimizer == "adam"


def test_round_trip_through_dict():
    config = load_config("smoke", ["train.seed=7"])
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("train.wrkers=2", ["unknown key", "train.wrkers", "workers"]),
        ("nope=1", ["unknown key", "nope", "train"]),
        ("train.workers=two", ["train.workers", "expected int"]),
        ("train.workers=0", ["train.workers", ">= 1"]),
        ("optim.lr_g=-0.1", ["optim.lr_g", "> 0"]),
        ("optim.lr_d=0", ["optim.lr_d", "> 0"]),
        ("data.resolution=24", ["data.resolution", "8, 16, 32"]),
        ("data.resolution=4", ["data.resolution", "cannot be built"]),
        ("model.g_norm=layer", ["model.g_norm", "batch, sync_batch, none"]),
        ("optim.decay=linear", ["optim.decay", "cosine"]),
        ("train.batch_size=63", ["train.batch_size", "multiple of train.workers"]),
        ("data.shards=1", ["data.shards", "train.workers"]),
        ("train.use_gpu=maybe", ["train.use_gpu", "expected bool"]),
        ("data.source=/nonexistent/file.npz", ["data.source", "no such file"]),
        ("eval.grid_size=10", ["eval.grid_size", "square"]),
        ("optim.warmup_steps=2000", ["optim.warmup_steps", "below train.steps"]),
        ("optim.g_optimizer=lamb", ["optim.g_optimizer", "adam, adamw, rmsprop, sgd"]),
        ("optim.gamma=2", ["optim:", "gamma", "(0, 1]"]),
        ("optim.decay=plateau train.eval_every=0", ["optim.decay=plateau", "train.eval_every"]),
        ("train.eval_every=25", ["train.eval_every", "multiple of train.report_every"]),
        ("train.report_seconds=-1", ["train.report_seconds", ">= 0"]),
        ("train.report_seconds=soon", ["train.report_seconds", "expected float"]),
        (
            "train.freeze_g_stats_in_d_phase=true",
            ["train.reuse_fakes", "train.freeze_g_stats_in_d_phase", "exclude each other"],
        ),
        ("eval.sampling_mode=average", ["eval.sampling_mode", "eval, train"]),
        ("eval.inception_weights=/nonexistent/w.pth", ["eval.inception_weights", "downloaded"]),
        ("tune.mutate=lr_g,momentum", ["tune.mutate", "momentum", "lr_g, lr_d, beta1, d_steps"]),
        ("tune.population=1", ["tune.population", ">= 2"]),
        ("optim.warmup=none", ["optim:", "warmup_steps"]),
        ("optim.warmup=cubic", ["optim.warmup", "none, linear, exponential"]),
        ("train.steps", ["key=value"]),
    ],
)
def test_bad_values_are_refused_with_the_key_named(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, override.split())
    for word in words:
        assert word in str(info.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="smoke"):
        load_config("nosuchpreset")


def test_cli_refuses_bad_config_before_any_ray_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", "train.workers=0", f"workdir={tmp_path}/w"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "train.workers must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()  # nothing was created


def test_cli_refuses_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", "-c", "smoke", f"workdir={blocker}/sub"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "cannot write to" in result.stderr and "workdir=PATH" in result.stderr
    assert "Traceback" not in result.stderr


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_refuses_an_unknown_forced_step(tmp_path):
    result = _cli("run", "--force", "trian", f"workdir={tmp_path}")
    assert result.returncode == 2
    assert "--force trian: no such step; steps: prepare, validate, fit_features" in result.stderr


def test_cli_refuses_resuming_an_unknown_run(tmp_path):
    result = _cli("run", "--resume", "0123abcd", f"workdir={tmp_path}")
    assert result.returncode == 2
    assert "--resume: no pipeline run '0123abcd'" in result.stderr
    assert "ganpipe runs" in result.stderr


def test_cli_refuses_overrides_with_resume(tmp_path):
    result = _cli("run", "--resume", "0123abcd", "optim.lr_g=1", f"workdir={tmp_path}")
    assert result.returncode == 2
    assert "only workdir, tracking_uri, experiment may be given" in result.stderr


def test_population_based_training_needs_the_distance_at_every_perturbation():
    from pipelines.config import validate_population

    validate_population(load_config("pbt"))
    for overrides, words in (
        (["train.eval_every=0"], ["tune.perturbation_interval", "train.eval_every"]),
        (["tune.perturbation_interval=300"], ["multiple of train.eval_every (250"]),
        (["tune.perturbation_interval=2000"], ["below train.steps"]),
    ):
        with pytest.raises(ConfigError) as info:
            validate_population(load_config("pbt", overrides))
        for word in words:
            assert word in str(info.value)
