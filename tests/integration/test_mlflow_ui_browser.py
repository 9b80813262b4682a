"""The smoke run as a person sees it: a real ``mlflow server`` on the run's store, rendered by
headless Chromium (Debian's package, driven by Playwright).

Writes a screenshot of the train step's charts and sample images to the test's folder, and to
docs/mlflow_ui.png when GANPIPE_UPDATE_SCREENSHOT=1.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from .mlflow_server import start_mlflow_server, stop_mlflow_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no chromium on PATH: apt-get install -y chromium (.ci/run installs it)",
    ),
]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "mlflow_ui.png"
TRAIN_METRICS = ("loss_d", "loss_g", "d_real", "d_fake", "lr_g", "lr_d")
# The MLflow UI loads its bundle and then each chart's data; on 2 busy cores that takes a while.
RENDER_TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def store(smoke_run) -> dict:
    """The smoke pipeline's experiment and its step runs (train, evaluate) by step name."""
    config, result = smoke_run
    client = MlflowClient(config.resolved_tracking_uri)
    parent = client.get_run(result.run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{result.run_id}'"
    )
    return {
        "client": client,
        "tracking_uri": config.resolved_tracking_uri,
        "experiment_id": parent.info.experiment_id,
        "parent": parent,
        "steps": {run.data.tags["ganpipe.step"]: run for run in children},
    }


@pytest.fixture(scope="module")
def ui(store, tmp_path_factory) -> Iterator[str]:
    uri, process = start_mlflow_server(
        tmp_path_factory.mktemp("mlflow-ui"), backend=store["tracking_uri"]
    )
    try:
        yield uri
    finally:
        stop_mlflow_server(process)


@pytest.fixture(scope="module")
def page(ui) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # The system chromium, not a Playwright browser build (none can be downloaded here).
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1800, "height": 1200})
            page.set_default_timeout(RENDER_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def _run_url(ui: str, store: dict, step: str, tab: str = "") -> str:
    run = store["steps"][step]
    return f"{ui}/#/experiments/{store['experiment_id']}/runs/{run.info.run_id}{tab}"


def _close_assistant(page) -> None:
    """MLflow 3 opens its assistant beside every page; it only narrows the screenshot."""
    close = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
    if close.count():
        close.first.click()


def test_train_run_page_shows_the_run_its_parent_and_metrics(page, ui, store):
    train = store["steps"]["train"]
    page.goto(_run_url(ui, store, "train"), wait_until="load")
    # Each part of the page arrives with its own request: wait for each text to be drawn.
    expected = [train.info.run_id, "Finished", store["parent"].info.run_name, *TRAIN_METRICS]
    for text in expected:  # the parent's name is the link back to the pipeline run
        page.get_by_text(text, exact=True).first.wait_for()
    assert page.locator("h2, h1").filter(has_text="train").count() >= 1


def _chart_points(page, metric: str) -> int:
    """Points of the line drawn in ``metric``'s chart card (Plotly path "M..L..L..")."""
    # The UI renders only the cards in view: filter down to this metric's card.
    page.get_by_placeholder("Search metric charts").fill(metric)
    card = page.locator(
        "[data-testid='experiment-view-compare-runs-card']",
        has=page.locator(f"h4[title='{metric}']"),
    )
    line = card.locator("path.js-line").first
    line.wait_for(state="attached")
    return line.get_attribute("d").count("L") + 1


def test_model_metrics_draw_every_report_and_the_sample_images(page, ui, store, tmp_path):
    client, train = store["client"], store["steps"]["train"]
    page.goto(_run_url(ui, store, "train", "/model-metrics"), wait_until="load")
    for metric in TRAIN_METRICS:
        history = client.get_metric_history(train.info.run_id, metric)
        assert _chart_points(page, metric) == len(history), metric

    # Sample grids logged per report with mlflow.log_image appear as an image card.
    logged_images = client.list_artifacts(train.info.run_id, "images")
    if logged_images:
        samples = page.locator(
            "[data-testid='experiment-view-compare-runs-card']",
            has=page.locator("h4[title='samples']"),
        )
        image = samples.locator("img").first
        image.wait_for(state="attached")
        page.wait_for_function(
            "img => img.complete && img.naturalWidth > 0", arg=image.element_handle()
        )

    _close_assistant(page)
    page.get_by_placeholder("Search metric charts").fill("loss")
    page.locator("h4[title='lr_d']").wait_for(state="detached")
    for metric in ("loss_d", "loss_g"):
        page.locator(f"h4[title='{metric}']").wait_for()
    if logged_images:
        # MLflow prints the run's parameters above the image; hide them, and make the row
        # taller (the card's resize handle), so that the whole grid shows.
        samples.evaluate(
            "card => { for (const e of card.querySelectorAll('div'))"
            " if (!e.children.length && e.textContent.includes('=')) e.style.display = 'none'; }"
        )
        handle = samples.locator("xpath=..").locator("[data-testid='draggable-card-resize-handle']")
        corner = handle.bounding_box()
        page.mouse.move(corner["x"] + 4, corner["y"] + 4)
        page.mouse.down()
        page.mouse.move(corner["x"] + 4, corner["y"] + 160, steps=10)
        page.mouse.up()
        page.wait_for_function(
            "img => img.getBoundingClientRect().bottom < 760", arg=image.element_handle()
        )
    shot = tmp_path / "mlflow_ui.png"
    page.screenshot(path=str(shot), clip={"x": 0, "y": 0, "width": 1800, "height": 800})
    with Image.open(shot) as picture:
        assert picture.size == (1800, 800)
    if os.environ.get("GANPIPE_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, DOCS_SCREENSHOT)


def test_evaluate_artifacts_show_the_sample_grid(page, ui, store, tmp_path):
    evaluate = store["steps"]["evaluate"]
    local = store["client"].download_artifacts(
        evaluate.info.run_id, "samples/samples.png", str(tmp_path)
    )
    with Image.open(local) as grid:
        width = grid.size[0]
    page.goto(_run_url(ui, store, "evaluate", "/artifacts/samples/samples.png"), wait_until="load")
    page.get_by_text("samples/samples.png").first.wait_for()
    # The preview is the logged file itself: an image of exactly its width finishes loading.
    page.wait_for_function(
        "w => [...document.images].some(i => i.complete && i.naturalWidth === w)", arg=width
    )
