"""GAN losses on raw discriminator logits, the gradient penalties R1 and WGAN-GP, and the
small-data regularizers LeCam and consistency (bCR).

Every loss is a pair of functions on raw logits (no sigmoid applied by the network):
``d_loss(real_logits, fake_logits)`` for the discriminator and ``g_loss(fake_logits)`` for the
generator. Each term is a mean over its own batch, so real and fake batches may differ in size.
:func:`get_loss` picks a pair by the names in :data:`LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gan.transfer import to_device

LOSSES = ("nonsaturating", "hinge", "wasserstein", "least_squares")

DLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GLoss = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------- non-saturating


def nonsaturating_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z))), written with softplus for numerical stability."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def nonsaturating_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(G(z)): the generator's non-saturating loss from Goodfellow et al. (2014)."""
    return F.softplus(-fake_logits).mean()


# ---------------------------------------------------------------------------------------- hinge


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """mean relu(1 - D(x)) + mean relu(1 + D(G(z))) (Lim & Ye 2017; SN-GAN, SAGAN)."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-mean D(G(z))."""
    return -fake_logits.mean()


# ---------------------------------------------------------------------------------- wasserstein


def wasserstein_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """mean D(G(z)) - mean D(x): the critic's loss of WGAN; pair it with a Lipschitz constraint
    (``gradient_penalty``, or spectral norm)."""
    return fake_logits.mean() - real_logits.mean()


def wasserstein_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-mean D(G(z))."""
    return -fake_logits.mean()


# -------------------------------------------------------------------------------- least squares


def least_squares_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """LSGAN with a=0, b=1: 0.5 * (mean (D(x) - 1)^2 + mean D(G(z))^2)."""
    return 0.5 * ((real_logits - 1.0).pow(2).mean() + fake_logits.pow(2).mean())


def least_squares_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """LSGAN with c=1: 0.5 * mean (D(G(z)) - 1)^2."""
    return 0.5 * (fake_logits - 1.0).pow(2).mean()


_LOSS_FUNCTIONS: dict[str, tuple[DLoss, GLoss]] = {
    "nonsaturating": (nonsaturating_d_loss, nonsaturating_g_loss),
    "hinge": (hinge_d_loss, hinge_g_loss),
    "wasserstein": (wasserstein_d_loss, wasserstein_g_loss),
    "least_squares": (least_squares_d_loss, least_squares_g_loss),
}
assert tuple(_LOSS_FUNCTIONS) == LOSSES


def get_loss(name: str) -> tuple[DLoss, GLoss]:
    """``(d_loss_fn, g_loss_fn)`` of the loss ``name``, one of :data:`LOSSES`."""
    try:
        return _LOSS_FUNCTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(LOSSES)}") from None


# ------------------------------------------------------------------------------------ penalties


def _input_gradient(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """d(sum logits)/d inputs, kept in the graph so that a penalty on it can be minimized."""
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return grad


def r1_from_logits(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """0.5 * mean over samples of ||d D(x) / d x||^2, from logits already computed on ``real``.

    ``real`` must require grad and ``real_logits`` be computed from it; this lets a training
    step reuse its discriminator forward on the reals instead of running one more.
    """
    grad = _input_gradient(real_logits, real)
    return 0.5 * grad.pow(2).flatten(1).sum(1).mean()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): 0.5 * E ||grad_x D(x)||^2 over real images.

    The graph is kept (create_graph=True) so that the penalty can be backpropagated to D's
    parameters. Scale it by gamma (and, for lazy regularization, by the interval).
    """
    x = real.detach().requires_grad_(True)
    return r1_from_logits(discriminator(x), x)


def _uniform_per_sample(
    reference: torch.Tensor, rng: torch.Generator | None = None
) -> torch.Tensor:
    """One U[0, 1) value per sample, shaped to broadcast against ``reference``."""
    shape = (reference.shape[0],) + (1,) * (reference.dim() - 1)
    if rng is None:
        return torch.rand(shape, device=reference.device, dtype=reference.dtype)
    alpha = torch.rand(shape, generator=rng, device=rng.device, dtype=reference.dtype)
    return to_device(alpha, reference.device)


def gradient_penalty(
    discriminator: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): mean (||grad_x D(x_hat)||_2 - 1)^2.

    ``x_hat = alpha * real + (1 - alpha) * fake`` with one alpha ~ U[0, 1) per sample, drawn from
    ``rng`` (on the generator's own device) or the global RNG. Neither input receives gradient;
    the graph is kept (create_graph=True) for D's parameters. Multiply by the GP weight (10).
    """
    if real.shape != fake.shape:
        raise ValueError(
            f"gradient_penalty needs real and fake batches of one shape, got "
            f"{tuple(real.shape)} and {tuple(fake.shape)}"
        )
    alpha = _uniform_per_sample(real, rng)
    x_hat = (alpha * real.detach() + (1.0 - alpha) * fake.detach()).requires_grad_(True)
    grad = _input_gradient(discriminator(x_hat), x_hat)
    norms = grad.flatten(1).norm(2, dim=1)
    return (norms - 1.0).pow(2).mean()


# ------------------------------------------------------------------------------ regularizers


def consistency_penalty(logits: torch.Tensor, augmented_logits: torch.Tensor) -> torch.Tensor:
    """Consistency regularization (bCR, Zhao et al. 2020): mean (D(x) - D(T(x)))^2.

    Both sides keep their graph: D is pulled towards the same output for an image and its
    augmentation. Multiply by the consistency weight.
    """
    if logits.shape != augmented_logits.shape:
        raise ValueError(
            f"consistency_penalty needs logits of one shape, got {tuple(logits.shape)} and "
            f"{tuple(augmented_logits.shape)}"
        )
    return (logits - augmented_logits).pow(2).mean()


def lecam_penalty(
    real_logits: torch.Tensor,
    fake_logits: torch.Tensor,
    anchor_real: torch.Tensor | float,
    anchor_fake: torch.Tensor | float,
) -> torch.Tensor:
    """LeCam regularization (Tseng et al. 2021): mean relu(D(x) - a_F)^2 + mean relu(a_R -
    D(G(z)))^2, with a_R and a_F moving averages of D's outputs on reals and fakes.

    The paper writes the terms without the relu; its authors' code (and PyTorch-StudioGAN) keep
    it, penalizing only real logits above the fake anchor and fake logits below the real one,
    i.e. only the part of D's output that separates the two. This is the code's form.
    """
    return (
        F.relu(real_logits - anchor_fake).pow(2).mean()
        + F.relu(anchor_real - fake_logits).pow(2).mean()
    )


class LeCamAnchors:
    """The moving averages a_R and a_F of D's mean output on reals and fakes for
    :func:`lecam_penalty`, kept across training steps (and in the checkpoint).

    The first :meth:`update` sets them to the observed means (no bias towards an arbitrary start
    value); later ones average with ``decay`` (0.99, as the LeCam paper). They stay tensors on
    the logits' device, so updating them never waits for the accelerator. With data-parallel
    workers each worker averages its own logits; the anchors only shift the penalty's
    threshold, and the gradients are averaged anyway.
    """

    def __init__(self, decay: float = 0.99) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.real: torch.Tensor | None = None
        self.fake: torch.Tensor | None = None

    def update(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
        real, fake = real_logits.detach().mean(), fake_logits.detach().mean()
        if self.real is None or self.fake is None:
            self.real, self.fake = real, fake
            return
        self.real = self.decay * self.real.to(real.device) + (1.0 - self.decay) * real
        self.fake = self.decay * self.fake.to(fake.device) + (1.0 - self.decay) * fake

    def state_dict(self) -> dict[str, torch.Tensor | float | None]:
        def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().cpu().clone()

        return {"decay": self.decay, "real": cpu(self.real), "fake": cpu(self.fake)}

    def load_state_dict(self, state: dict[str, torch.Tensor | float | None]) -> None:
        missing = [k for k in ("decay", "real", "fake") if k not in state]
        if missing:
            raise ValueError(f"not a LeCamAnchors state: missing {', '.join(missing)}")
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        self.real = None if state["real"] is None else torch.as_tensor(state["real"]).clone()
        self.fake = None if state["fake"] is None else torch.as_tensor(state["fake"]).clone()


__all__ = [
    "LOSSES",
    "LeCamAnchors",
    "consistency_penalty",
    "lecam_penalty",
    "get_loss",
    "gradient_penalty",
    "hinge_d_loss",
    "hinge_g_loss",
    "least_squares_d_loss",
    "least_squares_g_loss",
    "nonsaturating_d_loss",
    "nonsaturating_g_loss",
    "r1_from_logits",
    "r1_penalty",
    "wasserstein_d_loss",
    "wasserstein_g_loss",
]
