"""Every default of ptqd in one place: the library's signatures and the command line read them here.

Sampling: DDIM, 50 steps, eta 1, classifier-free guidance 3 for conditional models (1 otherwise),
seed 0. Calibration: 256 FP trajectories × 10 kept steps (seed 1000, never an evaluation seed),
1024 reconstruction inputs, 200 AdaRound and 100 step-size iterations per block, batch 32, blocks
reconstructed in module registration order (``registration``; ``forward``, the order the forward
pass runs them, is the option). Noise statistics: 256 trajectories, seed
2000, scored on held-out trajectories of seed 2001 (a quarter as many, at most 64); correction model
``ptqd`` (the paper's). Presets: ``default`` (those) and ``quick`` (about a minute on the bundled
model on 2 CPU cores).
"""

SCHEDULER = "ddim"
STEPS = 50
ETA = 1.0
GUIDANCE = 3.0  # conditional models; unconditional ones have no guidance (1.0)
SEED = 0
BATCH_SIZE = 250
NUM_SAMPLES = 1000
CHUNK_SIZE = 1000

CALIB_SAMPLES = 256
CALIB_STEPS = 10
CALIB_SEED = 1000
RECON_SAMPLES = 1024
WEIGHT_ITERS = 200
ACT_ITERS = 100
RECON_BATCH = 32
BLOCK_ORDERS = ("forward", "registration")  # order of block reconstruction: forward-pass order, module registration order
BLOCK_ORDER = "registration"  # forward order measured no better (digits-ldm W4A4: −1.2 dB, one calibration)
BLOCK_ORDER_BEFORE = "registration"  # what run configs without the field were made with

NOISE_SAMPLES = 256
NOISE_SEED = 2000
HELDOUT_SAMPLES = 64  # at most: trajectories of another seed every correction model is scored on (a quarter of the fit's)
HELDOUT_SEED = 2001
CORRECTION_MODEL = "ptqd"  # the paper's CNC/BC; mean, content, content-pixel: ptqd.correction.models
POSTERIOR_TAU = 10.0  # the posterior correction model's horizon: 1 = content, ∞ = debias
RIDGE = 1e-4  # ridge penalty of the regression correction models, relative to the feature variance
MATCHED_SAMPLES = 64  # lockstep trajectory pairs the matched maps are fitted on (one batch, in memory)
MATCHED_GAMMA = 0.5  # trajectory-matched maps: share of the FP/quantized state gap one step tries to close
MATCHED_RIDGE = 1e-3  # their ridge penalty toward the identity map, relative to the feature variance
BUDGET_PROPAGATION = "measured"  # how --fidelity-budget predicts each step's share of the final error
GUARD = True  # every correction is guarded by its measured effect on the final samples (ptqd.correction.guard)
GUARD_SAMPLES = 32  # calibration trajectories the guard measures on
GUARD_SEED = 2002  # never an evaluation seed (those are 0, 1, …), nor the statistics' (2000, 2001)
GUARD_BLOCKS = 5  # contiguous blocks of steps, one λ each
SENSITIVITY_SAMPLES = 16  # FP trajectories the measured step contributions are averaged over

PRESETS = {
    "default": {
        "options": {"recon_samples": RECON_SAMPLES, "weight_iters": WEIGHT_ITERS, "act_iters": ACT_ITERS, "batch_size": RECON_BATCH},
        "calib_samples": CALIB_SAMPLES, "calib_steps": CALIB_STEPS, "noise_samples": NOISE_SAMPLES,
    },
    "quick": {
        "options": {"recon_samples": 64, "weight_iters": 4, "act_iters": 4, "batch_size": 16},
        "calib_samples": 16, "calib_steps": 4, "noise_samples": 16
    },
}


def guidance(conditional: bool) -> float:
    """The default guidance scale: GUIDANCE for conditional models, 1 (none) otherwise."""
    return GUIDANCE if conditional else 1.0
