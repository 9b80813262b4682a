"""gan.sampling: seeded latents, the image grid layout, and chunked generation."""

from __future__ import annotations

import pytest
import torch

from gan.nn.models import Generator
from gan.sampling import balanced_labels, generate, image_grid, latents_from_seeds

DIM = 6


def _randn(seed: int, count: int, dim: int = DIM) -> torch.Tensor:
    padded = -(-dim // 16) * 16  # whole rows of 16: see latents_from_seeds
    return torch.randn(count, padded, generator=torch.Generator().manual_seed(seed))[:, :dim]


def test_one_latent_per_seed_drawn_from_that_seed():
    z = latents_from_seeds([5, 7, 9], DIM)
    assert z.shape == (3, DIM)
    assert z.dtype == torch.float32
    for row, seed in enumerate([5, 7, 9]):
        assert torch.equal(z[row], _randn(seed, 1)[0])
    assert not torch.equal(z[0], z[1])


def test_same_seed_same_latent_regardless_of_batch():
    alone = latents_from_seeds([7], DIM)[0]
    assert torch.equal(latents_from_seeds([5, 7, 9], DIM)[1], alone)
    assert torch.equal(latents_from_seeds([9, 8, 1, 7], DIM)[3], alone)
    assert torch.equal(latents_from_seeds([7, 7], DIM)[1], alone)
    mixed = latents_from_seeds([3, 7], DIM, counts=[4, 1])
    assert torch.equal(mixed[4], alone)


def test_latents_do_not_depend_on_the_global_rng():
    torch.manual_seed(0)
    a = latents_from_seeds([11, 12], DIM)
    torch.manual_seed(999)
    torch.randn(100)
    b = latents_from_seeds([11, 12], DIM)
    assert torch.equal(a, b)


# torch's CPU randn redoes the tail of a tensor whose size is not a multiple of 16, so sizes that
# are not multiples of 16 are the ones that would break "the same seed gives the same image".
@pytest.mark.parametrize("dim", [1, 6, 10, 16, 64, 100])
def test_counts_draw_in_order_from_each_seed(dim):
    z = latents_from_seeds([3, 4, 8], dim, counts=[3, 0, 2])
    assert z.shape == (5, dim)
    assert torch.equal(z[:3], _randn(3, 3, dim))
    assert torch.equal(z[3:], _randn(8, 2, dim))
    # The first of count=3 is the count=1 latent; the first two of count=3 are count=2's.
    assert torch.equal(z[0], latents_from_seeds([3], dim)[0])
    assert torch.equal(z[:2], latents_from_seeds([3], dim, counts=[2]))
    assert torch.equal(z[:3], latents_from_seeds([3], dim, counts=[5])[:3])
    assert len({tuple(r.tolist()) for r in z[:3]}) == 3


def test_empty_inputs_give_zero_latents():
    assert latents_from_seeds([], DIM).shape == (0, DIM)
    assert latents_from_seeds([1, 2], DIM, counts=[0, 0]).shape == (0, DIM)


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 seeds but 3 counts"):
        latents_from_seeds([1, 2], DIM, counts=[1, 1, 1])
    with pytest.raises(ValueError, match="2 seeds but 1 counts"):
        latents_from_seeds([1, 2], DIM, counts=[1])


def test_negative_count_raises():
    with pytest.raises(ValueError, match="count must be >= 0, got -1 for seed 2"):
        latents_from_seeds([1, 2], DIM, counts=[1, -1])


def test_image_grid_small_layout_by_hand():
    a, b, c = -0.5, 0.0, 0.5
    images = torch.tensor([a, b, c]).view(3, 1, 1, 1)
    grid = image_grid(images, columns=2, padding=1)
    w = 1.0
    expected = torch.tensor(
        [
            [w, w, w, w, w],
            [w, a, w, b, w],
            [w, w, w, w, w],
            [w, c, w, w, w],
            [w, w, w, w, w],
        ]
    )
    assert grid.shape == (1, 5, 5)
    assert torch.equal(grid[0], expected)


@pytest.mark.parametrize(("columns", "padding"), [(None, 1), (3, 2), (1, 0), (5, 1)])
def test_image_grid_positions_and_white_padding(columns, padding):
    n, c, h, w = 5, 3, 2, 3
    # Distinct constants per image and per channel, none of them white.
    values = torch.arange(n * c, dtype=torch.float32).view(n, c) / (n * c) - 0.9
    images = values.view(n, c, 1, 1).expand(n, c, h, w).clone()
    grid = image_grid(images, columns=columns, padding=padding)

    cols = columns or 2  # round(sqrt(5)) == 2
    rows = -(-n // cols)
    assert grid.shape == (c, rows * (h + padding) + padding, cols * (w + padding) + padding)
    covered = torch.zeros(grid.shape[1:], dtype=torch.bool)
    for i in range(n):
        r, k = i // cols, i % cols
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        cell = grid[:, top : top + h, left : left + w]
        assert torch.equal(cell, images[i]), i
        covered[top : top + h, left : left + w] = True
    # Everything that is not an image (padding and empty cells) is white (+1).
    assert (grid[:, ~covered] == 1.0).all()
    assert int(covered.sum()) == n * h * w


def test_image_grid_default_columns_is_rounded_square_root():
    images = torch.zeros(10, 1, 2, 2)
    grid = image_grid(images, padding=0)  # round(sqrt(10)) = 3 columns, 4 rows
    assert grid.shape == (1, 8, 6)
    assert int((grid == 0).sum()) == 10 * 4


@pytest.fixture(scope="module")
def generator() -> Generator:
    torch.manual_seed(0)
    g = Generator(latent_dim=DIM, resolution=8, channels=3, width=4, norm="batch")
    g.train()
    with torch.no_grad():  # give the batch norms non-trivial running statistics
        for _ in range(3):
            g(torch.randn(16, DIM))
    return g.eval()


def test_generate_in_chunks_equals_one_batch(generator):
    z = latents_from_seeds(range(10), DIM)
    small = generate(generator, z, batch_size=3)
    big = generate(generator, z, batch_size=512)
    assert small.shape == (10, 3, 8, 8)
    torch.testing.assert_close(small, big, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(big, generator(z), rtol=0, atol=1e-6)
    assert not big.requires_grad
    assert not generator.training  # mode kept
    # Each image depends only on its own seed in eval mode.
    single = generate(generator, latents_from_seeds([4], DIM))
    torch.testing.assert_close(single[0], big[4], rtol=0, atol=1e-6)


def test_generate_keeps_train_mode():
    torch.manual_seed(1)
    g = Generator(latent_dim=DIM, resolution=8, width=4, norm="batch").train()
    running = g.net[1].running_mean.clone()
    out = generate(g, torch.randn(4, DIM), batch_size=2)
    assert g.training
    assert out.shape == (4, 1, 8, 8)
    # In train mode the batch norm used (and updated) batch statistics.
    assert not torch.equal(g.net[1].running_mean, running)


def test_generate_zero_latents_keeps_the_image_shape():
    generator = Generator(latent_dim=6, resolution=8, channels=3, width=4).eval()
    assert generate(generator, latents_from_seeds([1], 6, [0])).shape == (0, 3, 8, 8)


def test_conditional_generation_passes_each_seed_its_label():
    torch.manual_seed(0)
    g = Generator(latent_dim=8, resolution=8, width=4, num_classes=3).eval()
    latents = latents_from_seeds(list(range(7)), 8)
    labels = balanced_labels(7, 3)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    together = generate(g, latents, labels=labels)
    in_chunks = generate(g, latents, batch_size=2, labels=labels)
    assert torch.equal(together, in_chunks)
    assert torch.allclose(together[3], g(latents[3:4], labels[3:4])[0])
    assert balanced_labels(5, 0) is None
