"""The FID Inception-v3 network as a feature extractor, with weights read from a local file.

This is the network pytorch-fid and torch-fidelity use for FID ("pt_inception-2015-12-05"): the
TensorFlow 2015-12-05 Inception-v3 ported to PyTorch, which differs from torchvision's Inception-v3
in four blocks (average pools that ignore padding, a max pool in the last block) and has a
1008-way classifier. It is built here in plain torch (no torchvision) with the parameter names of
torchvision's `Inception3`, so that pytorch-fid's published weights file loads as it is. Nothing is
downloaded: the user passes the path of a file they already have.

Features are the 2048-d pool3 activations FID is defined on. Inputs are images in [-1, 1], 1 or 3
channels, any size; they are resized to 299×299 bilinearly (as pytorch-fid does) and a grey channel
is repeated to RGB. The network expects exactly [-1, 1] (pytorch-fid maps its [0, 1] input to
that range), so no further scaling is applied.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gan.state import torch_load_refusal

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
)
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's 1008 outputs; kept only so the published file loads strictly
# A 299×299 forward holds ~20 MB of activations per image; 32 images stay well under a gigabyte.
CHUNK_SIZE = 32
# Slack for images that went through float arithmetic on their way to [-1, 1].
RANGE_TOLERANCE = 1e-3
_MAX_LISTED = 5

ArrayLike = np.ndarray | torch.Tensor


class InceptionWeightsError(ValueError):
    """The weights file is unreadable, not a state dict, or not the FID Inception-v3's."""


class BasicConv2d(nn.Module):
    """Conv (no bias) → batch norm (eps 0.001, as TensorFlow's) → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool leaves the zero padding out of the mean; torch's default does not.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35→17 (unchanged from torchvision)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            b7d = layer(b7d)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, b7d, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17→8 (unchanged from torchvision)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class FIDInceptionE(nn.Module):
    """The last two blocks. `max_pool` selects the second one (Mixed_7c), whose pool branch the
    TF graph computes with a max pool instead of an average pool; FID's published numbers depend
    on that quirk, so it is kept."""

    def __init__(self, in_channels: int, *, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _tf_avg_pool(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], 1)


def _as_images(images: ArrayLike) -> torch.Tensor:
    """Float32 CPU (N, 3, H, W) in [-1, 1]; refuses layouts and ranges that give silent junk."""
    t = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if t.ndim != 4 or t.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be shaped (N, C, H, W) with C = 1 or 3, got shape {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        # uint8 pixels in [0, 255] would pass the network unnoticed and give meaningless features.
        raise ValueError(f"images must be floats in [-1, 1], got dtype {t.dtype}")
    t = t.detach().to(dtype=torch.float32, device="cpu")
    if t.numel():
        lo, hi = float(t.min()), float(t.max())
        in_range = lo >= -1 - RANGE_TOLERANCE and hi <= 1 + RANGE_TOLERANCE  # False for NaN
        if not in_range:
            raise ValueError(f"images must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]")
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (pool3 features), parameter names as in pytorch-fid's weights file.

    `forward` takes (N, 1 or 3, H, W) images in [-1, 1] and returns (N, 2048) with autograd;
    `features` is the extractor interface shared with `DigitClassifier`: no grad, eval mode,
    chunks of `chunk_size`, float32 on CPU whatever device the network is on. `fc` (1008 classes)
    is loaded with the weights but not used.
    """

    feature_dim = FEATURE_DIM

    def __init__(self, chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 299, 299) in [-1, 1] → (N, 2048) pool3 activations, with autograd."""
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1 or 3, H, W) in [-1, 1] → (N, 2048), resizing to 299×299 as pytorch-fid does."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images shaped (N, 1 or 3, H, W), got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # Bilinear without align_corners, like pytorch-fid (torch-fidelity uses a TF1-style resize,
        # so its features differ slightly at sizes other than 299).
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return self.embed(x)

    @torch.no_grad()
    def features(self, images: ArrayLike) -> torch.Tensor:
        """(N, 2048) pool3 features on CPU, float32, without grad, in chunks of `chunk_size`."""
        x = _as_images(images)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()  # batch norm must use the file's running statistics
        try:
            outs = [
                self(x[i : i + self.chunk_size].to(device)).float().cpu()
                for i in range(0, len(x), self.chunk_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(outs) if outs else torch.empty(0, FEATURE_DIM)


def _expected_file() -> str:
    return f"{FID_WEIGHTS_NAME} from pytorch-fid's releases ({FID_WEIGHTS_URL})"


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f" (+{more} more)" if more > 0 else "")


def _is_counter(key: str) -> bool:
    # Batch-norm step counters: FID never reads them and files saved by older torch lack them.
    return key.endswith(".num_batches_tracked")


def _matched_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: FIDInceptionV3, path: str
) -> dict[str, torch.Tensor]:
    """The file's tensors under the model's keys, or InceptionWeightsError naming what is off."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not _is_counter(k)]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {_listed(wrong_shape)}")
    if problems:
        raise InceptionWeightsError(
            f"{path}: not the FID Inception-v3 weights (expected {_expected_file()}); "
            + "; ".join(problems)
        )
    # A fresh plain dict: the model's own counters fill in any the file lacks.
    return {k: state_dict.get(k, v) for k, v in expected.items()}


def _read_state_dict(path: str) -> Mapping[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception weights file not found: {path} (expected {_expected_file()})"
        )
    try:
        # weights_only refuses pickles that would run code, so a foreign file cannot execute.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or corrupt files
        raise InceptionWeightsError(
            f"{path}: not a torch state dict of tensors; torch.load(weights_only=True) refused it "
            f"({torch_load_refusal(exc)}); expected {_expected_file()}"
        ) from exc
    if not isinstance(obj, Mapping) or not obj:
        raise InceptionWeightsError(
            f"{path}: holds a {type(obj).__name__}, not a state dict of tensors; "
            f"expected {_expected_file()}"
        )
    not_tensors = [
        f"{k!s} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)
    ]
    if not_tensors or not all(isinstance(k, str) for k in obj):
        raise InceptionWeightsError(
            f"{path}: not a flat state dict of tensors (non-tensor entries: "
            f"{_listed(not_tensors) or 'non-string keys'}); expected {_expected_file()}"
        )
    return obj


def load_inception_extractor(
    path: str | os.PathLike[str], *, chunk_size: int = CHUNK_SIZE
) -> FIDInceptionV3:
    """Build the FID Inception-v3, load its weights from the local file `path`, return it in eval
    mode on CPU with gradients off.

    The file must be a state dict with pytorch-fid's parameter names and shapes
    (pt_inception-2015-12-05-6726825d.pth); anything else raises InceptionWeightsError naming the
    file and the first mismatching keys. A missing file raises FileNotFoundError.
    """
    path = os.fspath(path)
    state_dict = _read_state_dict(path)
    # The random initialisation is overwritten at once; it must not move the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        model = FIDInceptionV3(chunk_size=chunk_size)
    model.load_state_dict(_matched_state_dict(state_dict, model, path), strict=True)
    model.requires_grad_(False)
    return model.eval()
