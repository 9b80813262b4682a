"""How evaluate (and so the registered model) samples: eval or train mode, standing statistics."""

from __future__ import annotations

import pytest
import torch

from gan.nn.normalization import batch_norm_layers
from gan.state import save_state
from pipelines.config import load_config
from pipelines.loop import build_models
from pipelines.seeds import STANDING_STATS_SEED
from pipelines.steps.evaluate import load_generator


@pytest.fixture()
def checkpoint(tmp_path):
    config = load_config("smoke")
    torch.manual_seed(0)
    generator, discriminator = build_models(config, channels=1)
    for layer in batch_norm_layers(generator):  # running statistics far from any batch's
        layer.running_mean.fill_(5.0)
        layer.running_var.fill_(9.0)
    opt_g = torch.optim.Adam(generator.parameters())
    opt_d = torch.optim.Adam(discriminator.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: 1.0)
    save_state(
        tmp_path, step=1, generator=generator, discriminator=discriminator, opt_g=opt_g,
        opt_d=opt_d, sched_g=sched, sched_d=sched, rng=torch.Generator(),
    )  # fmt: skip
    return str(tmp_path)


def test_eval_mode_keeps_the_trained_running_statistics(checkpoint):
    generator = load_generator(load_config("smoke"), checkpoint, channels=1)
    assert not generator.training
    assert all(float(m.running_mean.mean()) == 5.0 for m in batch_norm_layers(generator))


def test_train_mode_samples_with_batch_statistics(checkpoint):
    config = load_config("smoke", ["eval.sampling_mode=train"])
    assert load_generator(config, checkpoint, channels=1).training


def test_standing_statistics_replace_the_running_ones_by_the_average_over_k_batches(checkpoint):
    config = load_config("smoke", ["eval.standing_stats_batches=3"])
    generator = load_generator(config, checkpoint, channels=1)
    assert not generator.training
    first = batch_norm_layers(generator)[0]
    assert int(first.num_batches_tracked) == 3
    # By hand: the first layer's batch means over the same three latent batches, averaged.
    reference = load_generator(load_config("smoke"), checkpoint, channels=1)
    captured = []
    hook = batch_norm_layers(reference)[0].register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].mean(dim=(0, 2, 3)))
    )
    from gan.sampling import latents_from_seeds

    size, dim = config.train.batch_size, config.model.latent_dim
    for i in range(3):
        reference(latents_from_seeds([STANDING_STATS_SEED + i], dim, [size]))
    hook.remove()
    expected = torch.stack(captured).mean(dim=0)
    assert torch.allclose(first.running_mean, expected, atol=1e-5)
