"""Everything one training process trains with, built from the config, and one step of it.

The Ray Train worker (``pipelines/train.py``) and single-process benchmarks (``bench/``) build the
same models, optimizers, schedules, EMA and augmentation from the same keys here, so a figure
measured outside the pipeline is about the pipeline's training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gan.augment import AdaptiveAugment, Augment
from gan.ema import GeneratorEMA
from gan.losses import LeCamAnchors
from gan.nn.models import Discriminator, Generator
from gan.optim import make_optimizer, set_learning_rate
from gan.schedules import make_scheduler
from gan.state import load_state, load_worker_rng
from gan.step import StepStats, train_step
from gan.transfer import HostToDevice
from pipelines.config import Config, schedule_policy


def build_models(
    config: Config, channels: int, num_classes: int = 0
) -> tuple[Generator, Discriminator]:
    """G and D as the config says; class-conditional on ``num_classes`` classes when
    ``model.conditional`` is on (the dataset's manifest gives the count)."""
    m = config.model
    classes = num_classes if m.conditional else 0
    generator = Generator(
        latent_dim=m.latent_dim,
        resolution=config.data.resolution,
        channels=channels,
        width=m.g_width,
        norm=m.g_norm,
        g_output_norm=m.g_output_norm,
        num_classes=classes,
    )
    discriminator = Discriminator(
        resolution=config.data.resolution,
        channels=channels,
        width=m.d_width,
        norm=m.d_norm,
        d_input_norm=m.d_input_norm,
        num_classes=classes,
    )
    return generator, discriminator


class TrainingState:
    """G, D, their optimizers and schedules, the noise stream, the EMA generator and the
    augmentation of one training process (``rank`` picks its own noise stream; the weights are
    the same on every rank). ``num_classes`` is the dataset's; the networks use it when
    ``model.conditional`` is on."""

    def __init__(
        self,
        config: Config,
        channels: int,
        device: torch.device,
        rank: int = 0,
        num_classes: int = 0,
    ) -> None:
        self.config = config
        t, o, a = config.train, config.optim, config.augment
        torch.manual_seed(t.seed)  # identical initial weights on every worker
        self.generator, self.discriminator = build_models(config, channels, num_classes)
        self.num_classes = self.generator.num_classes
        p = config.perf
        layout = torch.channels_last if p.channels_last else torch.contiguous_format
        self.generator.to(device, memory_format=layout)
        self.discriminator.to(device, memory_format=layout)
        self.transfer = HostToDevice(device, pin_memory=p.pin_memory, channels_last=p.channels_last)
        self.autocast_dtype = torch.bfloat16 if p.precision == "bf16" else None
        self._compiled: dict[int, nn.Module] = {}
        hyper = dict(
            betas=(o.beta1, o.beta2),
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            fused=p.fused_optimizer,
        )
        self.opt_g = make_optimizer(o.g_optimizer, self.generator.parameters(), lr=o.lr_g, **hyper)
        self.opt_d = make_optimizer(
            o.d_optimizer, self.discriminator.parameters(), lr=o.lr_d, **hyper
        )
        policy = schedule_policy(config)
        self.sched_g = make_scheduler(self.opt_g, policy)
        self.sched_d = make_scheduler(self.opt_d, policy)
        self.rng = torch.Generator().manual_seed(t.seed * 1000 + rank)
        self.ema = (
            GeneratorEMA(self.generator, decay=config.ema.decay, start_step=config.ema.start_step)
            if config.ema.enabled
            else None
        )
        self.augment = Augment(a.kinds, p=a.p, rng=self.rng) if a.kinds else None
        # p moves once per augment.interval steps (see adapt_augmentation).
        self.ada = (
            AdaptiveAugment(target=a.target, adjust_speed=a.adjust_speed, interval=1, p=a.p)
            if a.adaptive
            else None
        )
        self.lecam = LeCamAnchors() if config.loss.lecam_weight > 0 else None
        self._real_sign_window = torch.zeros((), device=device)

    @property
    def evaluated(self) -> nn.Module:
        """The generator that evaluate scores and register serves: the EMA one when enabled."""
        return self.ema.module if self.ema is not None else self.generator

    def checkpoint_parts(self) -> dict[str, Any]:
        """The keyword arguments of :func:`gan.state.save_state` / ``load_state``."""
        extras = {"adaptive_augment": self.ada, "lecam": self.lecam}
        return dict(
            generator=self.generator,
            discriminator=self.discriminator,
            opt_g=self.opt_g,
            opt_d=self.opt_d,
            sched_g=self.sched_g,
            sched_d=self.sched_d,
            rng=self.rng,
            ema=self.ema,
            extras={name: obj for name, obj in extras.items() if obj is not None},
        )

    def restore(self, directory: str, rank: int, world: int) -> int:
        """Loads the whole state and this rank's noise stream; returns the step."""
        start = load_state(directory, **self.checkpoint_parts())
        own_rng = load_worker_rng(directory, rank, world)
        if own_rng is not None:
            self.rng.set_state(own_rng)
        else:  # written by another number of workers: a fresh stream per rank and step
            self.rng.manual_seed(self.config.train.seed * 1000 + rank + 7919 * start)
        if self.ada is not None:
            self.augment.p = self.ada.p
        return start

    def adopt_configured_hyperparameters(self) -> None:
        """After loading another run's state (a PBT exploit), put this config's learning rates
        and Adam betas back in effect: ``load_state_dict`` restored the donor's."""
        o = self.config.optim
        set_learning_rate(self.opt_g, o.lr_g)
        set_learning_rate(self.opt_d, o.lr_d)
        for optimizer in (self.opt_g, self.opt_d):
            for group in optimizer.param_groups:
                if "betas" in group:
                    group["betas"] = (o.beta1, o.beta2)

    def step(
        self,
        real: torch.Tensor,
        step: int,
        generator: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        labels: torch.Tensor | None = None,
    ) -> StepStats:
        """One D/G iteration on ``real`` (with its ``labels`` when the networks are
        class-conditional) with every configured option, then the schedules.
        ``generator``/``discriminator`` are DDP wrappers of this state's networks, if any."""
        loss, t = self.config.loss, self.config.train
        generator = generator if generator is not None else self.generator
        discriminator = discriminator if discriminator is not None else self.discriminator
        stats = train_step(
            generator=self._maybe_compiled(generator),
            discriminator=self._maybe_compiled(discriminator),
            opt_g=self.opt_g,
            opt_d=self.opt_d,
            real=real,
            latent_dim=self.config.model.latent_dim,
            rng=self.rng,
            generator_inner=self._maybe_compiled(self.generator),
            discriminator_inner=self._maybe_compiled(self.discriminator),
            loss=loss.kind,
            gp_weight=loss.gp_weight,
            r1_gamma=loss.r1_gamma,
            r1_interval=loss.r1_interval,
            d_steps=loss.d_steps,
            step=step,
            freeze_g_stats_in_d_phase=t.freeze_g_stats_in_d_phase,
            reuse_fakes=t.reuse_fakes,
            ema=self.ema,
            augment=self.augment,
            lecam_weight=loss.lecam_weight,
            lecam_anchors=self.lecam,
            consistency_weight=loss.consistency_weight,
            labels=labels if self.num_classes else None,
            num_classes=self.num_classes,
            autocast_dtype=self.autocast_dtype,
        )
        self.sched_g.step()
        self.sched_d.step()
        return stats

    def batch(
        self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows ``index`` of host ``images`` on this state's device, in the networks' memory
        layout (``perf.pin_memory``, ``perf.channels_last``), with their ``labels`` for a
        class-conditional model; None otherwise, with no operator to pick them."""
        picked = self.transfer.labels(labels[index]) if self.num_classes else None
        return self.transfer.images(images[index]), picked

    def _maybe_compiled(self, module: nn.Module) -> nn.Module:
        """``module`` under ``torch.compile`` when ``perf.compile`` is on, compiled once. The
        compiled wrapper shares the parameters; checkpoints, EMA and evaluation keep using the
        plain modules, whose state_dict keys carry no ``_orig_mod.`` prefix."""
        if not self.config.perf.compile:
            return module
        # Default mode: every call returns fresh outputs. The report window keeps each step's
        # logits until it ends (gan.step_stats), so a mode that reuses output buffers (CUDA
        # graphs, "reduce-overhead") would need them cloned.
        if id(module) not in self._compiled:
            self._compiled[id(module)] = torch.compile(module)
        return self._compiled[id(module)]

    def adapt_augmentation(
        self,
        stats: StepStats,
        step: int,
        average: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    ) -> None:
        """ADA: every ``augment.interval`` steps, move p by the overfitting signal
        E[sign(D(real))] of that window; ``average`` makes it the mean over all workers (equal
        local batches: the mean of their means), one all-reduce per interval."""
        if self.ada is None:
            return
        interval = self.config.augment.interval
        self._real_sign_window += stats.real_sign
        if (step + 1) % interval == 0:
            signal = average(self._real_sign_window / interval)
            images = self.config.train.batch_size * interval
            self.augment.p = self.ada.update(float(signal), images)
            self._real_sign_window.zero_()

    def report_plateau(self, distance: float) -> None:
        self.sched_g.report(distance)
        self.sched_d.report(distance)

    def rates(self) -> dict[str, float]:
        return {"lr_g": self.opt_g.param_groups[0]["lr"], "lr_d": self.opt_d.param_groups[0]["lr"]}
