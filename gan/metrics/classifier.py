"""A small digit classifier used as the feature extractor for the pipeline's metrics.

Inception features (as in FID) are meaningless for 16×16 digits, so the metrics embed images with a
CNN trained on the real data set instead: its penultimate activations feed the Fréchet distance
and its class probabilities feed the coverage metrics. It trains in seconds on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BASE_CHANNELS = 16
MAX_CHANNELS = 64
MIN_RESOLUTION = 8
MAX_RESOLUTION = 64
CHUNK_SIZE = 512

ArrayLike = np.ndarray | torch.Tensor


def _check_geometry(in_channels: int, resolution: int) -> None:
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
    if (
        not isinstance(resolution, int)
        or resolution < MIN_RESOLUTION
        or resolution > MAX_RESOLUTION
        or resolution & (resolution - 1)
    ):
        raise ValueError(
            f"resolution must be a power of two in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], "
            f"got {resolution!r}"
        )


def _as_images(images: ArrayLike) -> torch.Tensor:
    """Return images as a float32 CPU tensor of shape (N, C, H, W), checking the layout."""
    t = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if t.ndim != 4:
        raise ValueError(f"images must be shaped (N, C, H, W), got shape {tuple(t.shape)}")
    if t.shape[2] != t.shape[3]:
        raise ValueError(f"images must be square, got {t.shape[2]}x{t.shape[3]}")
    return t.detach().to(dtype=torch.float32, device="cpu")


def _as_labels(labels: ArrayLike, n: int, num_classes: int) -> torch.Tensor:
    t = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    t = t.detach().to(device="cpu")
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"labels must be shaped ({n},), got shape {tuple(t.shape)}")
    if t.is_floating_point():
        raise ValueError("labels must be integers")
    t = t.to(torch.int64)
    if n and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{int(t.min())}, {int(t.max())}]"
        )
    return t


class DigitClassifier(nn.Module):
    """CNN: conv(16) → stride-2 convs (32, 64, 64, ...) down to 2×2 → global average pool →
    Linear(feature_dim) → ReLU → Linear(num_classes), with batch norm after each conv.

    `features` (the ReLU'd penultimate layer) is the embedding used by the Fréchet distance. The
    widths are small on purpose: it must train in seconds on two CPU cores. `features`, `logits`
    and `predict_proba` always run in eval mode (batch-norm running statistics).
    """

    def __init__(
        self, in_channels: int, resolution: int, num_classes: int, feature_dim: int = 64
    ) -> None:
        super().__init__()
        _check_geometry(in_channels, resolution)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes!r}")
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be positive, got {feature_dim!r}")
        self.in_channels = in_channels
        self.resolution = resolution
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        # Stride-2 convs halve the map down to 2x2, so the receptive field spans the whole image
        # before global average pooling.
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, BASE_CHANNELS, 3, padding=1, bias=False),
            nn.BatchNorm2d(BASE_CHANNELS),
            nn.LeakyReLU(0.2),
        ]
        channels, size = BASE_CHANNELS, resolution
        while size > 2:
            out = min(2 * channels, MAX_CHANNELS)
            layers += [
                nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2),
            ]
            channels, size = out, size // 2
        layers += [
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, feature_dim),
            nn.ReLU(),
        ]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(feature_dim, num_classes)

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images shaped (N, {expected}), got {tuple(x.shape)}")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations with autograd (used for training)."""
        self._check_input(x)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits with autograd."""
        return self.head(self.embed(x))

    @torch.no_grad()
    def _batched(
        self, images: ArrayLike, fn: Callable[[torch.Tensor], torch.Tensor], width: int
    ) -> torch.Tensor:
        x = _as_images(images)
        self._check_input(x)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()  # batch norm must use its running statistics, and must not update them
        try:
            outs = [
                fn(x[i : i + CHUNK_SIZE].to(device)).cpu() for i in range(0, len(x), CHUNK_SIZE)
            ]
        finally:
            self.train(was_training)
        return torch.cat(outs) if outs else torch.empty(0, width)

    def features(self, images: ArrayLike) -> torch.Tensor:
        """(N, feature_dim) embedding on CPU, computed without grad in chunks of 512."""
        return self._batched(images, self.embed, self.feature_dim)

    def logits(self, images: ArrayLike) -> torch.Tensor:
        """(N, num_classes) logits on CPU, computed without grad in chunks of 512."""
        return self._batched(images, self.forward, self.num_classes)

    def predict_proba(self, images: ArrayLike) -> torch.Tensor:
        """(N, num_classes) softmax probabilities on CPU (input of the coverage metrics)."""
        return torch.softmax(self.logits(images), dim=1)


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (replicate padding + random crop)."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[
        torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
    ]


def train_classifier(
    images: ArrayLike,
    labels: ArrayLike,
    *,
    num_classes: int,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    feature_dim: int = 64,
    max_shift: int | None = None,
    num_threads: int | None = 1,
    log: Callable[[str], None] | None = None,
) -> DigitClassifier:
    """Train the feature extractor on real images; deterministic for a seed, returned in eval mode.

    Augments with random translations (up to `max_shift` pixels; by default 1 at 8×8 and 2 from
    16×16) so features are not tied to exact pixel positions. The global torch RNG is left as it
    was: initialisation runs under a forked RNG and batching/augmentation use their own generator.

    `num_threads` caps torch's intra-op threads while training (restored afterwards; None leaves
    them alone): the network is so small that a second thread gains ~10 %, while on a shared,
    busy CPU spin-waiting threads made training several times slower (5 s became 30 s).
    """
    x = _as_images(images)
    y = _as_labels(labels, len(x), num_classes)
    if len(x) == 0:
        raise ValueError("cannot train a classifier on zero images")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError("epochs and batch_size must be positive and lr > 0")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be positive or None, got {num_threads!r}")
    in_channels, resolution = int(x.shape[1]), int(x.shape[2])
    _check_geometry(in_channels, resolution)
    if max_shift is None:
        max_shift = 1 if resolution < 16 else 2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(in_channels, resolution, num_classes, feature_dim)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        _fit(model, optimizer, x, y, epochs, batch_size, max_shift, generator, log)
    finally:
        torch.set_num_threads(previous_threads)
    model.eval()
    return model


def _fit(
    model: DigitClassifier,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int,
    max_shift: int,
    generator: torch.Generator,
    log: Callable[[str], None] | None,
) -> None:
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total_loss, correct = 0.0, 0
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            xb = _random_shift(x[idx], max_shift, generator)
            yb = y[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        if log is not None:
            log(
                f"classifier epoch {epoch + 1}/{epochs}: loss {total_loss / len(x):.4f} "
                f"train acc {correct / len(x):.4f} ({time.perf_counter() - start:.1f}s)"
            )


def classifier_accuracy(model: DigitClassifier, images: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of images whose argmax prediction equals the label (how much to trust features)."""
    y = _as_labels(labels, len(_as_images(images)), model.num_classes)
    if len(y) == 0:
        raise ValueError("cannot compute accuracy on zero images")
    predictions = model.logits(images).argmax(1)
    return float((predictions == y).float().mean())
