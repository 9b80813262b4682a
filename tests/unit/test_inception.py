"""The FID Inception-v3 extractor: weights loaded from a local file, checked before use.

No real weights exist on these machines, so the network's own random initialisation is saved and
loaded back. A 299×299 forward costs ~0.3 s per image on CPU: every test uses 2 images.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from gan.metrics.inception import (
    FEATURE_DIM,
    FID_WEIGHTS_NAME,
    FIDInceptionV3,
    InceptionWeightsError,
    load_inception_extractor,
)


@pytest.fixture(scope="module")
def reference_model() -> FIDInceptionV3:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FIDInceptionV3()
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                # He init keeps the signal alive through 90-odd layers; torch's default shrinks it
                # until every image gets the same features and the comparisons below mean nothing.
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, torch.nn.BatchNorm2d):
                # Non-default running statistics, so a loader that dropped buffers would be seen.
                module.running_mean.uniform_(-0.01, 0.01)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def weights_file(reference_model: FIDInceptionV3, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inception") / FID_WEIGHTS_NAME
    torch.save(reference_model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def extractor(weights_file: Path) -> FIDInceptionV3:
    return load_inception_extractor(weights_file)


def _images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


def _save(state: object, path: Path) -> Path:
    torch.save(state, path)
    return path


def test_parameter_names_and_shapes_follow_pytorch_fid_file(
    reference_model: FIDInceptionV3,
) -> None:
    # Names and shapes of torchvision's Inception3(num_classes=1008, aux_logits=False) with the FID
    # blocks swapped in: what pytorch-fid strictly loads pt_inception-2015-12-05-6726825d.pth into.
    shapes = {k: tuple(v.shape) for k, v in reference_model.state_dict().items()}
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Conv2d_1a_3x3.bn.running_var"] == (32,)
    assert shapes["Conv2d_4a_3x3.conv.weight"] == (192, 80, 3, 3)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert shapes["Mixed_6a.branch3x3.conv.weight"] == (384, 288, 3, 3)
    assert shapes["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert shapes["Mixed_7a.branch7x7x3_4.conv.weight"] == (192, 192, 3, 3)
    assert shapes["Mixed_7b.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["fc.weight"] == (1008, 2048)
    assert not any(k.startswith("AuxLogits") for k in shapes)
    assert not any(k.endswith("conv.bias") for k in shapes)  # BasicConv2d has no conv bias
    n_params = sum(p.numel() for p in reference_model.parameters())
    assert n_params == 23_850_960  # torchvision's Inception3 without aux (23,834,568) + 8 classes


@pytest.mark.parametrize(("channels", "size"), [(1, 16), (3, 16), (1, 32), (3, 32)])
def test_features_shape_and_finite(extractor: FIDInceptionV3, channels: int, size: int) -> None:
    feats = extractor.features(_images(2, channels, size).numpy())
    assert feats.shape == (2, FEATURE_DIM)
    assert feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert torch.isfinite(feats).all()
    assert not feats.requires_grad


def test_loaded_weights_reproduce_the_saved_model_deterministically(
    extractor: FIDInceptionV3, reference_model: FIDInceptionV3
) -> None:
    images = _images(2, 3, 32, seed=1)
    first = extractor.features(images)
    assert torch.equal(first, extractor.features(images))
    assert torch.equal(first, reference_model.features(images))
    assert not torch.allclose(first[0], first[1])  # different images, different features
    # Chunking only splits the work.
    one_by_one = _features_one_by_one(extractor, images)
    torch.testing.assert_close(one_by_one, first, rtol=1e-4, atol=1e-5)


def _features_one_by_one(model: FIDInceptionV3, images: torch.Tensor) -> torch.Tensor:
    previous = model.chunk_size
    model.chunk_size = 1
    try:
        return model.features(images)
    finally:
        model.chunk_size = previous


def test_grey_images_equal_their_rgb_repetition(extractor: FIDInceptionV3) -> None:
    grey = _images(2, 1, 16, seed=2)
    torch.testing.assert_close(
        extractor.features(grey), extractor.features(grey.repeat(1, 3, 1, 1)), rtol=0, atol=0
    )


def test_extractor_is_eval_cpu_without_grad_and_leaves_rng_alone(weights_file: Path) -> None:
    before = torch.random.get_rng_state()
    model = load_inception_extractor(weights_file)
    assert torch.equal(before, torch.random.get_rng_state())
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.features(torch.empty(0, 3, 16, 16)).shape == (0, FEATURE_DIM)


def test_file_without_batch_norm_counters_loads(
    reference_model: FIDInceptionV3, tmp_path: Path
) -> None:
    # Files written by older torch (before num_batches_tracked) must load too.
    state = {
        k: v for k, v in reference_model.state_dict().items() if "num_batches_tracked" not in k
    }
    model = load_inception_extractor(_save(state, tmp_path / "old.pth"))
    torch.testing.assert_close(model.fc.weight, reference_model.fc.weight, rtol=0, atol=0)


def test_missing_key_is_refused_by_name(reference_model: FIDInceptionV3, tmp_path: Path) -> None:
    state = reference_model.state_dict()
    del state["Mixed_6c.branch7x7_2.conv.weight"]
    path = _save(state, tmp_path / "missing.pth")
    with pytest.raises(InceptionWeightsError) as err:
        load_inception_extractor(path)
    message = str(err.value)
    assert str(path) in message
    assert "missing keys: Mixed_6c.branch7x7_2.conv.weight" in message
    assert FID_WEIGHTS_NAME in message and "pytorch-fid" in message


def test_misshaped_and_unexpected_keys_are_refused_by_name(
    reference_model: FIDInceptionV3, tmp_path: Path
) -> None:
    state = dict(reference_model.state_dict())
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head, not the FID one
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    path = _save(state, tmp_path / "torchvision_like.pth")
    with pytest.raises(InceptionWeightsError) as err:
        load_inception_extractor(path)
    message = str(err.value)
    assert "fc.weight (1000, 2048) (expected (1008, 2048))" in message
    assert "unexpected keys: AuxLogits.fc.weight" in message


def _truncated_state_dict(path: Path) -> None:
    torch.save({"a": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:200])


class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (os.getcwd, ())  # harmless, but weights_only must refuse to call it anyway


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), id="random"),
        pytest.param(
            lambda p: p.write_bytes(pickle.dumps({"x": _RunsCode()}, protocol=2)), id="code-pickle"
        ),
        pytest.param(lambda p: torch.save(torch.nn.Linear(2, 2), p), id="pickled-module"),
        pytest.param(lambda p: torch.save([torch.zeros(2)], p), id="list"),
        pytest.param(lambda p: torch.save({"state_dict": {"a": torch.zeros(1)}}, p), id="nested"),
        pytest.param(lambda p: torch.save({}, p), id="empty"),
        pytest.param(_truncated_state_dict, id="truncated"),
    ],
)
def test_non_state_dict_files_are_refused(content: object, tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    content(path)  # type: ignore[operator]
    with pytest.raises(InceptionWeightsError, match="weights.pth") as err:
        load_inception_extractor(path)
    assert FID_WEIGHTS_NAME in str(err.value)
    assert "set to `False`" not in str(err.value)  # torch's advice to load unsafely is not relayed


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_inception_extractor(tmp_path / "nowhere.pth")


def test_inputs_outside_minus_one_one_are_refused(extractor: FIDInceptionV3) -> None:
    with pytest.raises(ValueError, match="dtype"):
        extractor.features(np.zeros((1, 3, 16, 16), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        extractor.features(torch.full((1, 1, 16, 16), 255.0))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        extractor.features(torch.zeros(1, 4, 16, 16))
