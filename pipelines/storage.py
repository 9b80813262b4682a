"""Where step outputs live, and how they are written so that a half-written one is never used.

Local paths (and ``file://`` URIs) for now. Writes go to a temporary sibling first and are
renamed into place only when complete; a crash leaves a ``.tmp-*`` folder, never a bad output.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def local_path(uri: str | Path) -> Path:
    """A plain path for ``file://…`` or a path; other schemes are not supported yet."""
    text = str(uri)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    if "://" in text:
        raise ValueError(f"{text!r}: only local paths and file:// URIs are supported")
    return Path(text)


def check_writable(directory: str | Path) -> Path:
    """Create ``directory`` if needed and prove a file can be written there, or raise."""
    path = local_path(directory).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(
            f"cannot write to {str(path)!r} ({exc.strerror or exc}); "
            "choose a writable folder with workdir=PATH"
        ) from None
    return path


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes ``final`` only if the block succeeds."""
    final = local_path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    path = local_path(path)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)
