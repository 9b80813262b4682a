"""pipelines.storage: atomic outputs, writability checks and local URIs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipelines import storage
from pipelines.storage import atomic_dir, check_writable, local_path, write_json_atomic


def _tmp_siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_atomic_dir_success_moves_files_into_place(tmp_path):
    final = tmp_path / "outputs" / "step" / "dataset"  # parents are created
    with atomic_dir(final) as tmp:
        assert tmp.is_dir()
        assert list(tmp.iterdir()) == []
        assert tmp.parent == final.parent
        assert tmp.name.startswith(".tmp-dataset-")
        (tmp / "a.txt").write_text("alpha")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"\x00\x01")
        assert not final.exists()  # nothing visible until the block ends
    assert _tree(final) == {"a.txt": b"alpha", "sub/b.bin": b"\x00\x01"}
    assert _tmp_siblings(final.parent) == []
    assert not tmp.exists()


def test_atomic_dir_replaces_an_existing_output(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").read_text() == "old"  # untouched while writing
    assert _tree(final) == {"new.txt": b"new"}
    assert _tmp_siblings(tmp_path) == []


def test_atomic_dir_failure_leaves_no_output_and_no_tmp(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError, match="halfway"), atomic_dir(final) as tmp:
        (tmp / "partial.txt").write_text("half")
        raise RuntimeError("halfway")
    assert not final.exists()
    assert _tmp_siblings(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_failure_keeps_a_previous_output(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("previous result")
    before = _tree(final)
    with pytest.raises(KeyError), atomic_dir(final) as tmp:
        (tmp / "keep.txt").write_text("new but incomplete")
        raise KeyError("x")
    assert _tree(final) == before
    assert _tmp_siblings(tmp_path) == []


def test_atomic_dir_accepts_file_uris(tmp_path):
    final = tmp_path / "viauri"
    with atomic_dir(f"file://{final}") as tmp:
        (tmp / "x").write_text("1")
    assert (final / "x").read_text() == "1"


def test_atomic_dir_refuses_remote_uris_before_creating_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="only local paths"), atomic_dir("s3://bucket/out"):
        pytest.fail("the block must not run")
    assert list(tmp_path.iterdir()) == []


def test_write_json_atomic_writes_valid_json(tmp_path):
    payload = {"b": [1, 2.5, None], "a": {"nested": "text ü"}, "flag": True}
    path = tmp_path / "manifest.json"
    write_json_atomic(path, payload)
    assert json.loads(path.read_text()) == payload
    write_json_atomic(str(path), {"replaced": 1})
    assert json.loads(path.read_text()) == {"replaced": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_write_json_atomic_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert _tmp_siblings(tmp_path) == []


def test_check_writable_creates_the_folder(tmp_path):
    target = tmp_path / "a" / "b" / "work"
    result = check_writable(target)
    assert result == target.resolve()
    assert result.is_absolute()
    assert target.is_dir()
    assert list(target.iterdir()) == []  # the probe file was removed
    assert check_writable(f"file://{target}") == result  # idempotent, accepts URIs


def test_check_writable_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_writable("~/ganwork") == (tmp_path / "ganwork").resolve()
    assert (tmp_path / "ganwork").is_dir()


@pytest.mark.parametrize("below", ["", "child", "child/grandchild"])
def test_check_writable_refuses_a_path_under_a_regular_file(tmp_path, below):
    blocker = tmp_path / "plain.txt"
    blocker.write_text("not a folder")
    target = blocker / below if below else blocker
    with pytest.raises(PermissionError, match="workdir=PATH") as info:
        check_writable(target)
    assert str(target) in str(info.value)
    assert blocker.read_text() == "not a folder"


def test_local_path():
    assert local_path("file:///tmp/x/y") == Path("/tmp/x/y")
    assert local_path("/data/run") == Path("/data/run")
    assert local_path(Path("rel/dir")) == Path("rel/dir")
    assert local_path("relative/dir") == Path("relative/dir")
    assert isinstance(local_path("file:///a"), Path)


@pytest.mark.parametrize("uri", ["s3://bucket/key", "gs://b/k", "http://host/x"])
def test_local_path_refuses_other_schemes(uri):
    with pytest.raises(ValueError, match="only local paths and file:// URIs") as info:
        local_path(uri)
    assert uri in str(info.value)


# -- S3, against moto's S3 server over HTTP (tests/conftest.py: s3_server) --------------------


def _s3_config(s3_server, tmp_path, *overrides: str):
    from pipelines.config import load_config

    return load_config(
        None,
        [
            f"workdir=s3://{s3_server.bucket()}/runs",
            f"storage.s3_endpoint_url={s3_server.endpoint}",
            f"storage.local_dir={tmp_path / 'local'}",
            *overrides,
        ],
    )


def test_uris_join_and_split():
    assert storage.join("s3://b-1/runs/", "outputs", "x") == "s3://b-1/runs/outputs/x"
    assert storage.split_s3("s3://b-1/runs/a") == ("b-1", "runs/a")
    assert storage.join("/tmp/w", "outputs") == str(Path("/tmp/w/outputs"))
    assert storage.is_remote("s3://b-1/x") and not storage.is_remote("file:///x")


def test_publish_then_localize_round_trip_and_the_manifest_rule(s3_server, tmp_path):
    config = _s3_config(s3_server, tmp_path)
    staged = tmp_path / "staged"
    (staged / "sub").mkdir(parents=True)
    (staged / "a.json").write_text('{"a": 1}')
    (staged / "sub" / "b.bin").write_bytes(b"\x00" * 1000)
    (staged / ".tmp-x-1234").mkdir()  # an abandoned temporary folder is not published
    (staged / ".tmp-x-1234" / "junk").write_text("no")
    uri = storage.join(config.workdir, "outputs", "step")

    assert not storage.is_complete(uri, config)
    files = storage.publish_dir(staged, uri, config)
    assert files == {"a.json": 8, "sub/b.bin": 1000}
    bucket, prefix = storage.split_s3(uri)
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    assert sorted(o["Key"][len(prefix) + 1 :] for o in listed) == [
        "_COMPLETE.json", "a.json", "sub/b.bin",
    ]  # fmt: skip
    assert storage.is_complete(uri, config)
    assert storage.read_json(storage.join(uri, "a.json"), config) == {"a": 1}

    local = storage.localize(uri, config)
    assert local.is_relative_to(config.resolved_local_dir / "cache")
    assert (local / "sub" / "b.bin").read_bytes() == b"\x00" * 1000
    single = storage.localize(storage.join(uri, "a.json"), config)
    assert json.loads(single.read_text()) == {"a": 1}

    # An object missing or cut short since the manifest: no longer a complete output.
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/sub/b.bin", Body=b"short")
    assert not storage.is_complete(uri, config)
    s3_server.client().delete_object(Bucket=bucket, Key=f"{prefix}/sub/b.bin")
    assert not storage.is_complete(uri, config)
    with pytest.raises(FileNotFoundError, match="no such object or prefix"):
        storage.localize(storage.join(config.workdir, "nothing-here"), config)


def test_shards_stream_from_s3_through_pyarrow(s3_server, tmp_path):
    import pyarrow.parquet as pq

    from gan.data import ImageSet
    from gan.data.shards import read_shard, to_table

    config = _s3_config(s3_server, tmp_path)
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 256, (5, 1, 8, 8), dtype=np.uint8), np.arange(5))
    uri = storage.join(config.workdir, "shard-00000.parquet")
    fs, path = storage.filesystem(uri, config)
    assert fs.type_name == "s3" and path == uri[len("s3://") :]
    pq.write_table(to_table(data), path, filesystem=fs)
    back = read_shard(path, (1, 8, 8), filesystem=fs)
    assert np.array_equal(back.images, data.images) and np.array_equal(back.labels, data.labels)


def test_check_storage_accepts_a_writable_bucket_and_leaves_nothing(s3_server, tmp_path):
    config = _s3_config(s3_server, tmp_path)
    storage.check_storage(config)
    bucket, _ = storage.split_s3(config.workdir)
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_a_missing_bucket_is_one_clear_error_before_any_work(s3_server, tmp_path):
    from pipelines.runner import run_pipeline
    from pipelines.steps.default_dag import default_dag

    config = _s3_config(s3_server, tmp_path, "workdir=s3://no-such-bucket-here/runs")
    with pytest.raises(storage.StorageError) as info:
        run_pipeline(default_dag(), config)  # fails before Ray or MLflow start
    message = str(info.value)
    assert message.startswith("workdir=s3://no-such-bucket-here/runs: ")
    assert "bucket 'no-such-bucket-here' does not exist" in message
    assert "aws s3 mb s3://no-such-bucket-here" in message
    assert not (tmp_path / "local" / "mlflow.db").exists()

    source = _s3_config(s3_server, tmp_path, "data.source=s3://no-such-bucket-here/d.npz")
    with pytest.raises(storage.StorageError, match=r"^data\.source=s3://no-such-bucket-here/"):
        storage.check_storage(source)


def test_refused_credentials_are_one_clear_error_without_the_secret(s3_server, tmp_path):
    from moto.core.authorization import enable_iam_authentication

    config = _s3_config(s3_server, tmp_path)
    # moto checks keys against its IAM only when told to: ours exist nowhere, as wrong keys.
    with enable_iam_authentication(), pytest.raises(storage.StorageError) as info:
        storage.check_storage(config)
    message = str(info.value)
    assert message.startswith(f"workdir={config.workdir}: access denied")
    assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in message
    assert s3_server.secret not in message


def test_redact_blanks_the_secret(s3_server):
    text = f"boom {s3_server.secret} boom"
    assert storage.redact(text) == "boom *** boom"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("workdir=s3://AKIA:hunter22@bucket-1/runs", "credentials do not belong in a URI"),
        ("storage.s3_endpoint_url=http://key:hunter22@127.0.0.1:9000", "credentials do not"),
        ("storage.s3_endpoint_url=127.0.0.1:9000", "expected http(s)://HOST[:PORT]"),
        ("workdir=gs://bucket-1/runs", "unsupported scheme; use a path, file://PATH or s3://"),
        ("storage.artifact_uri=s3://Bad_Bucket/x", "is not an S3 bucket name"),
        ("storage.local_dir=s3://bucket-1/x", "storage.local_dir='s3://bucket-1/x' must be a"),
    ],
)
def test_config_refuses_bad_storage_locations(override, message):
    from pipelines.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_a_workdir_on_s3_keeps_mlflow_local_and_artifacts_in_the_bucket(tmp_path, monkeypatch):
    from pipelines.config import load_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config(None, ["workdir=s3://bucket-1/runs/", f"storage.local_dir={tmp_path}"])
    assert config.resolved_tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert config.resolved_artifact_uri == "s3://bucket-1/runs/mlartifacts"
    home = load_config(None, ["workdir=s3://bucket-1/runs"])
    assert home.resolved_local_dir == Path.home() / ".cache/ganpipe/bucket-1/runs"
    server = load_config(None, ["workdir=s3://bucket-1/runs", "tracking_uri=http://mlflow:5000"])
    assert server.resolved_artifact_uri is None  # the server's own artifact store
    chosen = load_config(None, ["tracking_uri=http://m:5000", "storage.artifact_uri=s3://a-b/x"])
    assert chosen.resolved_artifact_uri == "s3://a-b/x"
