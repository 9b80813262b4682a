"""Inception Score computed with the dataset's own classifier ("classifier IS").

The Inception Score (Salimans et al. 2016) is ``exp(E_x KL(p(y|x) || p(y)))``: high when each
sample is confidently recognised as one class (peaked p(y|x)) *and* the samples spread over many
classes (flat marginal p(y)). Its range is [1, C] for C classes. Instead of an ImageNet Inception
network, which says little about 8x8 digits, we feed the probabilities of our dataset classifier
(`DigitClassifier.predict_proba`), hence "classifier" IS. Like the reference implementation the
samples are cut into `splits` consecutive groups and the score's mean and std over groups are
reported, so pass the samples in random order (generator output is i.i.d., so it already is).
"""

from __future__ import annotations

import numpy as np
from scipy.special import rel_entr

from gan.metrics.coverage import check_probabilities


def classifier_inception_score(
    probabilities: np.ndarray, *, splits: int = 10
) -> tuple[float, float]:
    """(mean, std) over `splits` groups of ``exp(mean_x KL(p(y|x) || p(y)))``.

    `probabilities` is the (N, C) softmax output of the classifier on generated samples. The
    samples are divided into `splits` consecutive groups of (nearly) equal size with
    `numpy.array_split` (all samples are used); p(y) is the mean prediction within each group. The
    std is the population std (ddof=0) over groups, as in the reference implementation.

    The KL divergence uses `scipy.special.rel_entr`, which is ``p log(p / q)`` with the limit
    ``0 log 0 = 0`` taken exactly: the eps -> 0 limit of ``p (log(p + eps) - log(q + eps))``. It
    stays finite for one-hot predictions and adds no eps bias (one-hot predictions spread evenly
    over C classes give exactly C). Raises ValueError on a non-(N, C) array, negative or
    non-finite values, rows that do not sum to 1, or `splits` outside [1, N].
    """
    p = check_probabilities(probabilities)
    if not 1 <= splits <= p.shape[0]:
        raise ValueError(
            f"splits must be in [1, {p.shape[0]}] (the number of samples), got {splits}"
        )
    scores = np.empty(splits, dtype=np.float64)
    for i, part in enumerate(np.array_split(p, splits)):
        marginal = part.mean(axis=0, keepdims=True)
        kl = rel_entr(part, marginal).sum(axis=1)
        scores[i] = np.exp(kl.mean())
    return float(scores.mean()), float(scores.std())
