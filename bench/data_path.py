"""Data path: how fast batches come out of the Parquet shards into a worker, against how fast
training consumes them.

    python bench/data_path.py                         # the default digits shards
    python bench/data_path.py --consumption 1000      # training images/s to compare with
    python bench/data_path.py --synthetic 3x64x64:10000   # also a larger synthetic set

A Ray Train worker reads its shards once (``read_shard`` per file, ``concat``, ``to_model_range``)
and then samples every batch by index from the tensor in memory (``torch.randint`` and
``data[index]``, pipelines/train.py). Printed, one torch thread:

1. raw ``pyarrow.parquet.read_table`` of each shard file: MB/s and rows/s;
2. the worker's load: ``read_shard`` + ``concat`` + ``to_model_range`` of its shards (1 and 2
   workers), seconds and images/s;
3. per-step sampling: batches/s and images/s of index sampling (images and labels) at the local
   batch of 1 and 2 workers, and its ratio to ``--consumption`` (training images/s, from
   bench/train_overhead.py); also from a uint8 copy converted per batch, the alternative;
4. with ``--s3``: the worker's load from the same shards in a bucket of moto's S3 server on
   loopback (real HTTP), through ``pipelines.storage.filesystem`` as the workers read them.
   Sampling after the load is the same in-memory gather as above.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from harness import loadavg, machine, median, write_dataset

from gan.data import ImageSet
from gan.data.arrays import to_model_range
from gan.data.shards import concat, read_shard, split_shards, to_table
from pipelines.config import load_config


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return median(times)


def measure(label: str, shards: list[str], shape: tuple[int, ...], batch: int, consumption: float):
    print(f"\n{label}: {len(shards)} shards of {shape}")
    size = sum(Path(p).stat().st_size for p in shards)
    rows = sum(pq.read_metadata(p).num_rows for p in shards)
    raw = timed(lambda: [pq.read_table(p) for p in shards], 7)
    print(
        f"  pyarrow read_table, all shards: {raw * 1000:7.1f} ms for {rows} rows, "
        f"{size / 2**20:.1f} MiB on disk -> {size / 2**20 / raw:7.1f} MiB/s, "
        f"{rows / raw:9.0f} rows/s"
    )
    steps = 2000
    rng = torch.Generator().manual_seed(0)
    for world in (1, 2):
        own = shards[0::world]

        def load(own: list[str] = own) -> tuple[torch.Tensor, torch.Tensor]:
            part = concat([read_shard(p, shape) for p in own])
            return to_model_range(part.images), torch.from_numpy(part.labels)

        seconds = timed(load, 5)
        n = sum(pq.read_metadata(p).num_rows for p in own)
        print(
            f"  worker load ({world} worker(s), {len(own)} shards, "
            f"read_shard+concat+to_model_range): {seconds * 1000:7.1f} ms, "
            f"{n / seconds:9.0f} images/s"
        )
        data, labels = load()
        raw_images = torch.from_numpy(concat([read_shard(p, shape) for p in own]).images)
        local = batch // world

        def sample(
            data: torch.Tensor = data, labels: torch.Tensor = labels, local: int = local
        ) -> None:
            # As the worker loop: an index batch from the worker's generator, then a gather of
            # the float images and of the labels.
            for _ in range(steps):
                index = torch.randint(0, data.shape[0], (local,), generator=rng)
                data[index].to("cpu"), labels[index].to("cpu")

        def sample_uint8(
            data: torch.Tensor = raw_images, labels: torch.Tensor = labels, local: int = local
        ) -> None:
            # The alternative: keep uint8 (a quarter of the bytes), convert each batch.
            for _ in range(steps):
                index = torch.randint(0, data.shape[0], (local,), generator=rng)
                data[index].float().div_(127.5).sub_(1.0), labels[index]

        for name, fn in (
            ("float32 in memory (as now)", sample),
            ("uint8, per batch", sample_uint8),
        ):
            per_worker = steps / timed(fn, 5)
            # Each worker samples its own local batch in parallel: the global rate is the
            # per-worker batches/s times the global batch.
            images = per_worker * batch
            print(
                f"  index sampling, local batch {local}, {name}: {per_worker:8.0f} batches/s "
                f"per worker, {images:9.0f} global images/s = {images / consumption:5.0f}x the "
                f"training rate ({consumption:.0f} images/s)"
            )


def measure_s3(label: str, shards: list[str], shape: tuple[int, ...], config_overrides: list[str]):
    """The worker's load (step 2) with the shards on S3 (moto's server over HTTP)."""
    import logging
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    from pipelines import storage

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(name, value)
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bench")
        uris = []
        for path in shards:
            key = f"shards/{Path(path).name}"
            client.upload_file(path, "bench", key)
            uris.append(f"s3://bench/{key}")
        config = load_config(None, [f"storage.s3_endpoint_url={endpoint}", *config_overrides])
        print(f"\n{label} on S3 (moto server, {endpoint}):")
        for world in (1, 2):
            own = uris[0::world]

            def load(own: list[str] = own) -> None:
                parts = []
                for uri in own:
                    fs, path = storage.filesystem(uri, config)
                    parts.append(read_shard(path, shape, filesystem=fs))
                to_model_range(concat(parts).images)

            seconds = timed(load, 5)
            n = sum(pq.read_metadata(p).num_rows for p in shards[0::world])
            print(
                f"  worker load ({world} worker(s), {len(own)} shards from S3): "
                f"{seconds * 1000:7.1f} ms, {n / seconds:9.0f} images/s"
            )
    finally:
        server.stop()


def write_synthetic(directory: Path, spec: str) -> tuple[list[str], tuple[int, ...]]:
    dims, count = spec.split(":")
    shape = tuple(int(x) for x in dims.split("x"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (int(count), *shape), dtype=np.uint8)
    data = ImageSet(images, rng.integers(0, 10, int(count)).astype(np.int64))
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(split_shards(data, 4)):
        paths.append(str(directory / f"train-{i:05d}-of-00004.parquet"))
        pq.write_table(to_table(part), paths[-1])
    return paths, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--consumption",
        type=float,
        default=1000.0,
        help="training images/s to compare with (bench/train_overhead.py)",
    )
    parser.add_argument("--synthetic", help="also a synthetic set: CxHxW:count, e.g. 3x64x64:10000")
    parser.add_argument("--s3", action="store_true", help="also read the shards from moto S3")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each training worker

    print(f"machine: {machine()}")
    print(f"load average at start: {loadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, [f"workdir={tmp}", *args.overrides])
        dataset = write_dataset(config, Path(tmp) / "dataset")
        batch = config.train.batch_size
        measure("default dataset", dataset.shards, dataset.shape, batch, args.consumption)
        if args.s3:
            measure_s3("default dataset", dataset.shards, dataset.shape, args.overrides)
        if args.synthetic:
            paths, shape = write_synthetic(Path(tmp) / "synthetic", args.synthetic)
            measure(f"synthetic {args.synthetic}", paths, shape, batch, args.consumption)
            if args.s3:
                measure_s3(f"synthetic {args.synthetic}", paths, shape, args.overrides)
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
