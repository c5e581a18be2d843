"""PTQD: quantization-noise statistics, correlated-noise / bias correction, variance schedule
calibration, and step-aware mixed precision."""

from ptqd.correction.apply import (
    SamplingPlan,
    add_matched,
    collect_stats,
    find_stats,
    plan_sampling,
    quant_fingerprint,
    refit,
    schedule_for,
)
from ptqd.correction.corrector import PARTS, Corrector, ddim_quantities, ddpm_quantities, parse_parts
from ptqd.correction.guard import fit_guard
from ptqd.correction.matched import fit_matched
from ptqd.correction.mixed import CRITERIA, DEFAULT_CRITERION, bit_schedule, describe_schedule, snr_criterion, snr_fp, snr_q, snr_table
from ptqd.correction.stats import (
    STATS_SEED,
    NoiseMoments,
    NoiseStats,
    StatsRequest,
    check_stats,
    collect_moments,
    fit,
    load_stats,
    save_stats,
    stats_name,
)

__all__ = [
    "CRITERIA",
    "DEFAULT_CRITERION",
    "PARTS",
    "STATS_SEED",
    "Corrector",
    "NoiseMoments",
    "NoiseStats",
    "SamplingPlan",
    "StatsRequest",
    "add_matched",
    "bit_schedule",
    "check_stats",
    "collect_moments",
    "collect_stats",
    "ddim_quantities",
    "ddpm_quantities",
    "describe_schedule",
    "find_stats",
    "fit",
    "fit_guard",
    "fit_matched",
    "load_stats",
    "parse_parts",
    "plan_sampling",
    "quant_fingerprint",
    "refit",
    "save_stats",
    "schedule_for",
    "snr_criterion",
    "snr_fp",
    "snr_q",
    "snr_table",
    "stats_name",
]
