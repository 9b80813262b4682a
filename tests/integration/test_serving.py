"""The smoke run's champion, retrieved three ways, gives the same images for the same seeds:
``ganpipe generate`` (alias, version and run URIs), ``mlflow.pyfunc.load_model`` in a fresh
process, and ``mlflow models serve`` over real HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines.server import stop_server

from .mlflow_server import free_port

pytestmark = pytest.mark.integration
GANPIPE = str(Path(sys.executable).with_name("ganpipe"))
FIRST_SEED, COUNT = 11, 6  # `ganpipe generate` draws consecutive seeds
SEEDS = list(range(FIRST_SEED, FIRST_SEED + COUNT))


@pytest.fixture(scope="module")
def champion(smoke_run) -> dict[str, str]:
    config, _ = smoke_run
    name, uri = config.register.model_name, config.resolved_tracking_uri
    version = MlflowClient(uri).get_model_version_by_alias(name, "champion")
    return {
        "name": name,
        "tracking_uri": uri,
        "workdir": str(config.workdir),
        "alias_uri": f"models:/{name}@champion",
        "version_uri": f"models:/{name}/{version.version}",
        "run_uri": f"runs:/{version.run_id}/generator",
    }


@pytest.fixture(scope="module")
def reference(champion) -> np.ndarray:
    """The champion's images for SEEDS, in this process."""
    mlflow.set_tracking_uri(champion["tracking_uri"])
    model = mlflow.pyfunc.load_model(champion["alias_uri"])
    images = model.predict(pd.DataFrame({"seed": SEEDS}))
    assert images.shape[0] == COUNT and images.dtype == np.uint8
    assert len({image.tobytes() for image in images}) == COUNT  # distinct seeds, distinct images
    return images


def _env(tracking_uri: str) -> dict[str, str]:
    # `mlflow models serve` runs `uvicorn` by name: the venv's bin must be on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}


def test_a_fresh_process_loads_the_same_images_from_every_uri(champion, reference, tmp_path):
    code = (
        "import sys, mlflow, numpy as np, pandas as pd\n"
        f"seeds = pd.DataFrame({{'seed': {SEEDS}}})\n"
        "for i, uri in enumerate(sys.argv[2:]):\n"
        "    model = mlflow.pyfunc.load_model(uri)\n"
        "    np.save(f'{sys.argv[1]}/{i}.npy', model.predict(seeds))\n"
    )
    uris = [champion["alias_uri"], champion["version_uri"], champion["run_uri"]]
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), *uris],
        check=True,
        timeout=600,
        env=_env(champion["tracking_uri"]),
    )
    for i, uri in enumerate(uris):
        assert np.array_equal(np.load(tmp_path / f"{i}.npy"), reference), uri


def _grid_tiles(path: Path, count: int, size: int) -> np.ndarray:
    """Cut the images back out of `ganpipe generate`'s grid (gan.sampling.image_grid layout)."""
    grid = np.asarray(Image.open(path))
    columns = max(1, int(round(count**0.5)))
    tiles = []
    for i in range(count):
        row, column = divmod(i, columns)
        top, left = 1 + row * (size + 1), 1 + column * (size + 1)
        tiles.append(grid[top : top + size, left : left + size])
    return np.stack(tiles)[..., None]


@pytest.mark.parametrize("which", ["alias_uri", "version_uri", "run_uri"])
def test_ganpipe_generate_draws_the_same_images(champion, reference, tmp_path, which):
    out = tmp_path / "grid.png"
    done = subprocess.run(
        [GANPIPE, "generate", "--model", champion[which], "-n", str(COUNT)]
        + ["--seed", str(FIRST_SEED), "--out", str(out), "--workdir", champion["workdir"]],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {COUNT} images to {out}" in done.stdout
    assert np.array_equal(_grid_tiles(out, COUNT, reference.shape[1]), reference)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "models:/no-such-model@champion"], "no-such-model not found"),
        (["--model", "models:/{name}@no-such-alias"], "alias no-such-alias not found"),
        (["--model", "models:/{name}/999"], "version=999) not found"),
        (["--model", "models:/{name}@champion", "-n", "-3"], "-n must be >= 1, got -3"),
        (["--model", "models:/{name}@champion", "--seed", "abc"], "--seed must be a whole number"),
        (["--model", "models:/{name}@champion", "--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--model", "models:/{name}@champion", "-n", "200000"], "at most 100000 images per call"),
    ],
)
def test_ganpipe_generate_bad_input_is_one_clear_line(champion, tmp_path, args, message):
    done = subprocess.run(
        [GANPIPE, "generate", *[a.format(name=champion["name"]) for a in args]]
        + ["--out", str(tmp_path / "grid.png"), "--workdir", champion["workdir"]],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ganpipe: error: "), done.stderr
    assert message in lines[0]
    assert not (tmp_path / "grid.png").exists()


@pytest.fixture(scope="module")
def served(champion, tmp_path_factory) -> Iterator[str]:
    """`mlflow models serve` on the champion alias; its base URL once /ping answers."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", champion["alias_uri"]]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(champion["tracking_uri"]),
            start_new_session=True,  # uvicorn runs in a child: stop the whole group
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # model loading on 2 busy cores takes a while
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no /ping answer in 300 s: {log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        stop_server(process)


def _invoke(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_rest_invocations_return_the_same_images(served, reference):
    status, answer = _invoke(
        served, {"dataframe_split": {"columns": ["seed"], "data": [[s] for s in SEEDS]}}
    )
    assert status == 200
    assert np.array_equal(np.asarray(answer["predictions"], dtype=np.uint8), reference)

    # The same images as PNG files; the second seed asks for two images drawn from it.
    status, answer = _invoke(
        served,
        {
            "dataframe_records": [{"seed": SEEDS[0], "count": 1}, {"seed": SEEDS[1], "count": 2}],
            "params": {"format": "png"},
        },
    )
    assert status == 200
    rows = answer["predictions"]
    assert [(r["seed"], r["index"]) for r in rows] == [(SEEDS[0], 0), (SEEDS[1], 0), (SEEDS[1], 1)]
    decoded = [np.asarray(Image.open(io.BytesIO(base64.b64decode(r["png"])))) for r in rows]
    assert np.array_equal(decoded[0], reference[0, :, :, 0])
    assert np.array_equal(decoded[1], reference[1, :, :, 0])
    assert not np.array_equal(decoded[2], decoded[1])


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"seed": "abc"}], "Failed to convert column seed"),
        ([{"seed": 1, "count": -1}], "'count' must be >= 0, got -1"),
        ([{"seed": 1, "label": 3}], "this generator is unconditional"),
        ([{"count": 2}], "seed"),
    ],
)
def test_rest_refuses_bad_input_with_400_naming_it(served, records, message):
    status, answer = _invoke(served, {"dataframe_records": records})
    assert status == 400
    assert message in answer["message"]
