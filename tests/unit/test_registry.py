"""The registry on a real MLflow store (SQLite), without Ray: alias policy, promote, and the
pyfunc generator logged, loaded and called as MLflow does."""

from __future__ import annotations

import io

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from gan.data.arrays import from_model_range
from gan.state import STATE_FILE
from pipelines.config import load_config
from pipelines.loop import build_models
from pipelines.registry import (
    CHALLENGER,
    CHAMPION,
    DATA_DIGEST_TAG,
    DISTANCE_TAG,
    PROMOTED_TAG,
    RegistryError,
    apply_alias_policy,
    eval_protocol,
    generator_spec,
    log_generator,
    promote,
)

DIGEST, PROTOCOL = "a" * 64, "samples=200,classifier_epochs=2"


@pytest.fixture
def client(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("gen")
    return client


def _new_version(client, tmp_path) -> str:
    source = tmp_path / "model"
    source.mkdir(exist_ok=True)
    return str(client.create_model_version("gen", source.as_uri()).version)


def _alias(client, alias: str) -> str:
    return str(client.get_model_version_by_alias("gen", alias).version)


def test_first_version_is_champion_then_only_a_better_one_takes_over(client, tmp_path):
    v1 = _new_version(client, tmp_path)
    first = apply_alias_policy(client, "gen", v1, 10.0, DIGEST, PROTOCOL)
    assert (first.alias, first.previous_champion) == (CHAMPION, None)

    v2 = _new_version(client, tmp_path)
    worse = apply_alias_policy(client, "gen", v2, 12.0, DIGEST, PROTOCOL)
    assert (worse.alias, worse.previous_champion) == (CHALLENGER, v1)
    assert "does not beat" in worse.reason
    assert (_alias(client, CHAMPION), _alias(client, CHALLENGER)) == (v1, v2)

    v3 = _new_version(client, tmp_path)
    tie = apply_alias_policy(client, "gen", v3, 10.0, DIGEST, PROTOCOL)
    assert tie.alias == CHALLENGER  # a tie does not take over
    assert (_alias(client, CHAMPION), _alias(client, CHALLENGER)) == (v1, v3)

    v4 = _new_version(client, tmp_path)
    better = apply_alias_policy(client, "gen", v4, 7.5, DIGEST, PROTOCOL)
    assert (better.alias, better.previous_champion) == (CHAMPION, v1)
    assert (_alias(client, CHAMPION), _alias(client, CHALLENGER)) == (v4, v4)
    tags = client.get_model_version("gen", v4).tags
    assert (tags[DISTANCE_TAG], tags[DATA_DIGEST_TAG]) == ("7.5", DIGEST)


@pytest.mark.parametrize(
    ("digest", "protocol", "why"),
    [("b" * 64, PROTOCOL, "other data"), (DIGEST, "samples=1000,classifier_epochs=15", "differ")],
)
def test_a_distance_measured_another_way_never_takes_champion(
    client, tmp_path, digest, protocol, why
):
    v1 = _new_version(client, tmp_path)
    apply_alias_policy(client, "gen", v1, 10.0, DIGEST, PROTOCOL)
    v2 = _new_version(client, tmp_path)
    decision = apply_alias_policy(client, "gen", v2, 0.1, digest, protocol)
    assert decision.alias == CHALLENGER
    assert why in decision.reason and f"ganpipe promote gen {v2}" in decision.reason
    assert _alias(client, CHAMPION) == v1


def test_promote_moves_champion_and_names_the_previous_one(client, tmp_path):
    v1 = _new_version(client, tmp_path)
    apply_alias_policy(client, "gen", v1, 10.0, DIGEST, PROTOCOL)
    v2 = _new_version(client, tmp_path)
    apply_alias_policy(client, "gen", v2, 12.0, DIGEST, PROTOCOL)

    assert promote(client, "gen", v2) == v1
    assert _alias(client, CHAMPION) == v2
    assert client.get_model_version("gen", v2).tags[PROMOTED_TAG].endswith("by hand (was v1)")


def test_promote_errors_list_what_exists(client, tmp_path):
    _new_version(client, tmp_path)
    _new_version(client, tmp_path)
    with pytest.raises(RegistryError, match=r"no registered model 'nope'; registered: gen$"):
        promote(client, "nope", "1")
    with pytest.raises(RegistryError, match=r"'gen' has no version '7'; versions: 1, 2$"):
        promote(client, "gen", "7")
    with pytest.raises(MlflowException):  # promote set nothing
        client.get_model_version_by_alias("gen", CHAMPION)


def _logged_generator(tmp_path, *overrides: str, num_classes: int = 0):
    """A smoke-sized generator with non-trivial running statistics, logged and registered."""
    config = load_config("smoke", [f"workdir={tmp_path}", *overrides])
    generator, _ = build_models(config, channels=1, num_classes=num_classes)
    labels = torch.arange(8) % num_classes if num_classes else None
    with torch.no_grad():  # a few training-mode passes so running stats differ from batch stats
        for seed in range(3):
            z = torch.randn(8, config.model.latent_dim, generator=torch.manual_seed(seed))
            generator(z, labels)
    generator.eval()
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    torch.save({"generator": generator.state_dict()}, checkpoint / STATE_FILE)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    # An explicit artifact root: a SQLite store's default is ./mlruns in the working directory.
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    version = log_generator(
        run_id=run_id,
        tracking_uri=uri,
        config=config,
        checkpoint=str(checkpoint),
        shape=[1, 16, 16],
        model_name="gen",
    )
    mlflow.set_tracking_uri(uri)
    return generator, mlflow.pyfunc.load_model(f"models:/gen/{version}"), config


@pytest.fixture(scope="module")
def eval_model(tmp_path_factory):
    return _logged_generator(tmp_path_factory.mktemp("eval"), "eval.sampling_mode=eval")


def test_pyfunc_gives_the_generators_images_one_seed_one_image(eval_model):
    from gan.sampling import latents_from_seeds

    generator, model, config = eval_model
    images = model.predict(pd.DataFrame({"seed": [3, 1, 4]}))
    assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8
    with torch.no_grad():
        expected = generator(latents_from_seeds([3, 1, 4], config.model.latent_dim))
    assert np.array_equal(images, from_model_range(expected).transpose(0, 2, 3, 1))
    alone = model.predict(pd.DataFrame({"seed": [4]}))
    assert np.array_equal(alone[0], images[2])  # eval mode: independent of the rest of the batch

    counted = model.predict(pd.DataFrame({"seed": [3, 4], "count": [2, 0]}))
    assert counted.shape[0] == 2 and np.array_equal(counted[0], images[0])


def test_pyfunc_png_param_returns_the_same_images_as_png(eval_model):
    _, model, _ = eval_model
    arrays = model.predict(pd.DataFrame({"seed": [5, 6], "count": [1, 2]}))
    table = model.predict(pd.DataFrame({"seed": [5, 6], "count": [1, 2]}), params={"format": "png"})
    assert list(table.columns) == ["seed", "index", "png"]
    assert table["seed"].tolist() == [5, 6, 6] and table["index"].tolist() == [0, 0, 1]
    for array, png in zip(arrays, table["png"], strict=True):
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG"
            assert np.array_equal(np.asarray(image), array[:, :, 0])


def test_pyfunc_signature_params_and_input_example(eval_model):
    _, model, _ = eval_model
    signature = model.metadata.signature
    assert signature.inputs.input_names() == ["seed", "count", "label"]
    assert signature.inputs.required_input_names() == ["seed"]
    assert [(p.name, p.default) for p in signature.params.params] == [("format", "array")]
    assert model.input_example["seed"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("frame", "params", "message"),
    [
        (pd.DataFrame({"seed": [1], "label": [3]}), None, "unconditional: drop the 'label'"),
        (pd.DataFrame({"seed": [1], "count": [-2]}), None, "'count' must be >= 0, got -2"),
        (pd.DataFrame({"seed": [-1]}), None, "'seed' must be >= 0, got -1"),
        (pd.DataFrame({"seed": [1.5]}), None, "seed"),
        (pd.DataFrame({"seed": ["x"]}), None, "seed"),
        (pd.DataFrame({"count": [1]}), None, "seed"),
        (pd.DataFrame({"seed": [1]}), {"format": "jpeg"}, "format 'jpeg' is not one of"),
    ],
)
def test_pyfunc_refuses_bad_input_naming_it(eval_model, frame, params, message):
    _, model, _ = eval_model
    with pytest.raises((ValueError, MlflowException), match=message):
        model.predict(frame, params=params)


def test_train_sampling_mode_uses_the_requests_batch_statistics(tmp_path):
    from gan.sampling import latents_from_seeds

    generator, model, config = _logged_generator(tmp_path, "eval.sampling_mode=train")
    assert generator_spec(config, [1, 16, 16])["sampling_mode"] == "train"

    seeds = [0, 1, 2, 3, 4, 5]
    images = model.predict(pd.DataFrame({"seed": seeds}))
    trained = generator.train()
    with torch.no_grad():
        expected = from_model_range(trained(latents_from_seeds(seeds, config.model.latent_dim)))
    assert np.array_equal(images, expected.transpose(0, 2, 3, 1))
    assert np.array_equal(model.predict(pd.DataFrame({"seed": seeds})), images)  # buffers kept
    fewer = model.predict(pd.DataFrame({"seed": seeds[:3]}))
    assert not np.array_equal(fewer, images[:3])  # each image depends on the whole request


def test_eval_protocol_names_what_changes_the_distance():
    assert eval_protocol(load_config("smoke")) == "samples=200,classifier_epochs=2"


def test_ganpipe_promote_says_what_the_champion_was(client, tmp_path, capsys):
    from pipelines.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    v1 = _new_version(client, tmp_path)
    apply_alias_policy(client, "gen", v1, 10.0, DIGEST, PROTOCOL)
    v2 = _new_version(client, tmp_path)

    assert main(["promote", "gen", v2, "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out == f"gen@champion is now version {v2} (was: version {v1})\n"
    assert _alias(client, CHAMPION) == v2
    assert main(["promote", "gen", v2, "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out == f"gen@champion is already version {v2}\n"

    assert main(["promote", "gen", "9", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    expected = "ganpipe: error: model 'gen' has no version '9'; versions: 1, 2"
    assert err == f"{expected} (tracking store: {uri})\n"


def test_conditional_generator_draws_the_asked_classes(tmp_path):
    from gan.sampling import latents_from_seeds

    generator, model, config = _logged_generator(tmp_path, "model.conditional=true", num_classes=10)
    assert generator_spec(config, [1, 16, 16], 10)["generator"]["num_classes"] == 10
    z = latents_from_seeds([1, 2], config.model.latent_dim, [1, 3])
    with torch.no_grad():
        asked = from_model_range(generator(z, torch.tensor([7, 3, 3, 3]))).transpose(0, 2, 3, 1)
        cycled = from_model_range(generator(z, torch.tensor([0, 1, 2, 3]))).transpose(0, 2, 3, 1)

    frame = pd.DataFrame({"seed": [1, 2], "count": [1, 3]})
    assert np.array_equal(model.predict(frame.assign(label=[7, 3])), asked)
    assert np.array_equal(model.predict(frame), cycled)  # no label: the classes in turn
    table = model.predict(frame.assign(label=[7, 3]), params={"format": "png"})
    assert table["label"].tolist() == [7, 3, 3, 3]
    with pytest.raises(MlflowException, match=r"'label' must be a class in 0..9, got 10"):
        model.predict(frame.assign(label=[10, 3]))


def test_registered_weights_are_the_evaluated_ones_with_standing_statistics(tmp_path):
    from gan.sampling import latents_from_seeds
    from pipelines.steps.evaluate import load_generator

    trained, model, config = _logged_generator(tmp_path, "eval.standing_stats_batches=2")
    evaluated = load_generator(config, str(tmp_path / "checkpoint"), channels=1).eval()
    assert not torch.equal(evaluated.net[1].running_mean, trained.net[1].running_mean)
    z = latents_from_seeds([0, 1, 2], config.model.latent_dim)
    with torch.no_grad():
        expected = from_model_range(evaluated(z)).transpose(0, 2, 3, 1)
    assert np.array_equal(model.predict(pd.DataFrame({"seed": [0, 1, 2]})), expected)
