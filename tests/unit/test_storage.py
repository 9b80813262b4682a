"""pipelines.storage: atomic outputs, writability checks and local URIs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
