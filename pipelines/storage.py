"""Where step outputs live, and how they are written so that a half-written one is never used.

One layer for plain paths, ``file://…`` and ``s3://bucket/prefix`` URIs: pyarrow's file systems
(``pyarrow.fs.S3FileSystem`` on S3, which Ray Train takes as ``storage_filesystem`` too) and
boto3 for the checks that need S3's own error codes. Credentials, region and endpoint come from
the standard AWS chain (environment, ``~/.aws``, instance role); ``storage.s3_endpoint_url``
(else ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``) points them at an S3-compatible store.
No credential is ever passed as an argument here, so none can end up in a config, a pickled
file system object or an error message.

Atomic writes. Locally: a temporary sibling renamed into place when complete (a crash leaves a
``.tmp-*`` folder, never a bad output). On S3, where there is no rename: the objects first, then
a manifest (``_COMPLETE.json``: every file and its size) written last; a prefix without a
manifest that matches its objects is never taken as complete.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipelines.config import Config, ConfigError

S3 = "s3://"
COMPLETE = "_COMPLETE.json"  # written last into a published prefix: its files and their sizes
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # the AWS SDKs' own variables
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class StorageError(ConfigError):
    """A storage location that cannot be used; the message names the URI and the fix."""


# -- URIs ------------------------------------------------------------------------------------


def is_remote(uri: str | Path) -> bool:
    return str(uri).startswith(S3)


def join(uri: str | Path, *parts: str) -> str:
    """``uri`` with ``parts`` appended, as a URI on S3 and as a plain path otherwise."""
    if is_remote(uri):
        return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(local_path(uri), *parts))


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    bucket, _, key = uri[len(S3) :].partition("/")
    return bucket, key.strip("/")


def local_path(uri: str | Path) -> Path:
    """A plain path for ``file://…`` or a path; an S3 URI is refused (use ``localize``)."""
    text = str(uri)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    if "://" in text:
        raise ValueError(
            f"{text!r}: only local paths and file:// URIs are accepted here "
            "(an s3:// URI is read through storage.localize or storage.filesystem)"
        )
    return Path(text)


def endpoint_url(config: Config) -> str:
    """The S3 endpoint: ``storage.s3_endpoint_url``, else the AWS variables, else AWS's own."""
    if config.storage.s3_endpoint_url:
        return config.storage.s3_endpoint_url
    return next((os.environ[v] for v in ENDPOINT_ENV if os.environ.get(v)), "")


@functools.cache
def _s3_filesystem(endpoint: str, region: str) -> pafs.S3FileSystem:
    # Cached: building one costs a credential-chain lookup. Never given keys: it resolves
    # them itself in each process, so pickling it (Ray does) carries no secret.
    return pafs.S3FileSystem(
        endpoint_override=endpoint or None,
        region=region or None,
        allow_bucket_creation=False,
        allow_bucket_deletion=False,
    )


def _region(bucket: str, endpoint: str) -> str:
    configured = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if configured or endpoint:
        return configured or ""
    try:  # on AWS itself a bucket answers only in its region; ask it which (no credentials)
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return ""  # left to the SDK's default; check_storage turns a failure into one line


def filesystem(uri: str | Path, config: Config) -> tuple[pafs.FileSystem, str]:
    """The pyarrow file system of ``uri`` and the path on it (``bucket/key`` on S3)."""
    if is_remote(uri):
        bucket, key = split_s3(str(uri))
        endpoint = endpoint_url(config)
        fs = _s3_filesystem(endpoint, _region(bucket, endpoint))
        return fs, f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), str(local_path(uri).expanduser().resolve())


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """Inverse of ``filesystem``: what Ray Train reports (a path on its file system) as a URI."""
    return S3 + path.lstrip("/") if fs.type_name == "s3" else path


def s3_client(config: Config) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url(config) or None)


def configure_mlflow(config: Config) -> None:
    """MLflow's S3 artifact store reads its endpoint from ``MLFLOW_S3_ENDPOINT_URL``: set it
    from ``storage.s3_endpoint_url`` in every process that logs (the driver, each step)."""
    if config.storage.s3_endpoint_url:
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = config.storage.s3_endpoint_url


def redact(text: str) -> str:
    """``text`` with any secret of the AWS environment blanked: error text goes to MLflow."""
    for name in SECRET_ENV:
        secret = os.environ.get(name, "")
        if len(secret) >= 8:
            text = text.replace(secret, "***")
    return text


# -- reading and writing ---------------------------------------------------------------------


def exists(uri: str | Path, config: Config) -> bool:
    fs, path = filesystem(uri, config)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str | Path, config: Config) -> bytes:
    fs, path = filesystem(uri, config)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_json(uri: str | Path, config: Config) -> Any:
    return json.loads(read_bytes(uri, config))


def write_json(uri: str | Path, payload: Any, config: Config) -> None:
    """One JSON file, atomically: a rename locally, a single PUT (all or nothing) on S3."""
    if not is_remote(uri):
        write_json_atomic(uri, payload)
        return
    fs, path = filesystem(uri, config)
    with fs.open_output_stream(path) as stream:
        stream.write(json.dumps(payload, indent=2, sort_keys=True).encode())


def _files(fs: pafs.FileSystem, path: str) -> dict[str, int]:
    """Relative name -> size of every file under ``path``."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {
        info.path[len(path) :].lstrip("/"): info.size
        for info in infos
        if info.type == pafs.FileType.File
    }


def publish_dir(local: str | Path, uri: str, config: Config) -> dict[str, int]:
    """Upload the files under ``local`` to ``uri``, then ``_COMPLETE.json`` listing them."""
    local = Path(local)
    files = {
        str(p.relative_to(local)): p.stat().st_size
        for p in sorted(local.rglob("*"))
        if p.is_file() and not any(part.startswith(".tmp-") for part in p.parts)
    }
    fs, root = filesystem(uri, config)
    for name in files:
        pafs.copy_files(str(local / name), f"{root}/{name}", destination_filesystem=fs)
    write_json(join(uri, COMPLETE), {"files": files}, config)  # last: the prefix is complete
    return files


def is_complete(uri: str, config: Config) -> bool:
    """Whether ``uri`` holds a manifest and every file it lists, at the listed size."""
    fs, root = filesystem(uri, config)
    try:
        listed = read_json(join(uri, COMPLETE), config)["files"]
    except (FileNotFoundError, KeyError, ValueError):
        return False
    present = _files(fs, root)
    return all(present.get(name) == size for name, size in listed.items())


def cache_dir(config: Config) -> Path:
    return config.resolved_local_dir / "cache"


def localize(uri: str | Path, config: Config) -> Path:
    """A local path holding ``uri``: the path itself for local URIs; for S3 a copy (one object,
    or every object under a prefix) in the local cache, fetching only files it lacks or whose
    size differs. Step outputs are content-addressed and written once, so a copy stays valid."""
    if not is_remote(uri):
        return local_path(uri)
    fs, path = filesystem(uri, config)
    target = cache_dir(config) / path
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        wanted = {"": info.size}
    else:
        wanted = _files(fs, path)
        if not wanted:
            raise FileNotFoundError(f"{uri}: no such object or prefix")
    for name, size in wanted.items():
        source = f"{path}/{name}" if name else path
        local = target / name if name else target
        if local.is_file() and local.stat().st_size == size:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".tmp-{local.name}-{uuid.uuid4().hex[:8]}")
        pafs.copy_files(source, str(tmp), source_filesystem=fs)
        os.replace(tmp, local)  # whole files only: a reader never sees a partial one
    return target


# -- checks before any work ------------------------------------------------------------------


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


def _s3_failure(key: str, uri: str, exc: Exception, config: Config) -> StorageError:
    """One line naming the key, the URI and the fix, from a boto3/botocore error."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    bucket, _ = split_s3(uri)
    endpoint = endpoint_url(config) or "AWS's default endpoint"
    if isinstance(exc, NoCredentialsError):
        fix = (
            "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
            "or give the machine an instance role"
        )
    elif isinstance(exc, EndpointConnectionError):
        fix = f"cannot reach the S3 endpoint {endpoint}: check storage.s3_endpoint_url"
    elif isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            fix = (
                f"bucket {bucket!r} does not exist at {endpoint}: create it (aws s3 mb "
                f"s3://{bucket}) or set {key} to an existing bucket"
            )
        elif code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            fix = (
                f"access denied ({code}): check the AWS credentials of this machine "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or its instance role) "
                f"and that they may read and write s3://{bucket}"
            )
        else:
            fix = f"S3 answered {code or type(exc).__name__}: {exc}"
    else:
        fix = f"{type(exc).__name__}: {exc}"
    return StorageError(redact(f"{key}={uri}: {fix}"))


def _check_s3(key: str, uri: str, config: Config, write: bool) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client(config)
    bucket, prefix = split_s3(uri)
    try:
        client.head_bucket(Bucket=bucket)
        if write:
            probe = "/".join(p for p in (prefix, f".write-test-{uuid.uuid4().hex}") if p)
            client.put_object(Bucket=bucket, Key=probe, Body=b"")
            client.delete_object(Bucket=bucket, Key=probe)
        else:
            listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
            if not listed.get("KeyCount"):
                raise StorageError(f"{key}={uri}: no such object or prefix in s3://{bucket}")
    except (BotoCoreError, ClientError) as exc:
        raise _s3_failure(key, uri, exc, config) from None


def check_storage(config: Config) -> None:
    """Prove every location of ``config`` usable before any work starts: local folders
    writable; S3 buckets there and writable with this machine's credentials (read-only for
    ``data.source``). Raises StorageError (a ConfigError) naming the key, the URI and the fix."""
    if is_remote(config.workdir):
        _check_s3("workdir", config.workdir, config, write=True)
        check_writable(config.resolved_local_dir)
    else:
        check_writable(config.workdir)
    artifacts = config.storage.artifact_uri
    if is_remote(artifacts) and artifacts.rstrip("/") != config.workdir.rstrip("/"):
        _check_s3("storage.artifact_uri", artifacts, config, write=True)
    if is_remote(config.data.source):
        _check_s3("data.source", config.data.source, config, write=False)


# -- local atomic writes ---------------------------------------------------------------------


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
