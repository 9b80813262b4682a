"""Seeds of the latents each measurement draws: fixed, so that runs compare, and in ranges of
their own, so that no two measurements share latents."""

EVAL_SEED = 1_000_000  # the evaluate step's samples (and the registered model's examples)
PROBE_SEED = 2_000_000  # the evaluation distance measured during training
STANDING_STATS_SEED = 3_000_000  # batches that recompute standing batch-norm statistics
