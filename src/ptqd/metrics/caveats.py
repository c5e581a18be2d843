"""Sample sizes below which a metric says little, and the notes tables print beside such numbers.

Rules of thumb, in one place:

* Fréchet distances (FD, sFD, FID, sFID, FD→FP and its floor) fit a d-dimensional Gaussian; below
  10·d samples the covariance is poorly estimated and the distance is biased upward and noisy. Read
  such a number only against the FP→FP floor at the same N.
* Inception Score: the bundled digit metric averages 10 splits; with fewer than 100 images per split
  (N < 1000) every split saturates. The Inception evaluator uses splits of 5000 (ADM); below 5000
  there is not one full split.
* Precision/recall (k=3 nearest-neighbour manifolds): below 1000 points per side the balls are so
  large that recall and precision saturate towards 1.
"""

from __future__ import annotations

from typing import Any

FD_FACTOR = 10
FEATURE_DIMS = {
    "digits": {"fd": 64, "sfd": 256, "fd_fp": 64, "fd_fp_floor": 64, "fd_fp_ratio": 64},
    "inception": {"fid": 2048, "sfid": 2023, "fd_fp": 2048, "fd_fp_floor": 2048, "fd_fp_ratio": 2048},
}
IS_MIN = {"digits": 1000, "inception": 5000}
PR_MIN = 1000


def evaluator_of(metrics: dict[str, Any]) -> str:
    if metrics.get("evaluator") in FEATURE_DIMS:
        return metrics["evaluator"]
    return "inception" if "fid" in metrics else "digits"


def min_samples(metric: str, evaluator: str = "digits") -> int | None:
    """The smallest sample count at which ``metric`` is read without a caveat (None: no minimum)."""
    dims = FEATURE_DIMS.get(evaluator, FEATURE_DIMS["digits"])
    if metric in dims:
        return FD_FACTOR * dims[metric]
    if metric == "is":
        return IS_MIN.get(evaluator, IS_MIN["digits"])
    if metric in ("precision", "recall"):
        return PR_MIN
    return None


def _reason(metric: str, evaluator: str, need: int) -> str:
    if metric == "is":
        if evaluator == "inception":
            return "IS needs one full split of 5000 images"
        return f"IS averages 10 splits; below {need} images each split has fewer than 100"
    if metric in ("precision", "recall"):
        return f"k-NN precision/recall saturate below {need} images"
    return f"Fréchet distances in {need // FD_FACTOR}-d features are biased below {need} images; read them against the FP→FP floor"


def caveats(metrics: dict[str, Any], keys: list[str] | None = None) -> dict[str, str]:
    """``{metric: why it is unreliable}`` for the metrics of ``metrics`` (a metrics dict with
    ``num_samples``) whose sample count is below :func:`min_samples`."""
    n = metrics.get("num_samples")
    if not isinstance(n, int):
        return {}
    ev = evaluator_of(metrics)
    out = {}
    for k in keys or list(metrics):
        need = min_samples(k, ev)
        if need is not None and metrics.get(k) is not None and n < need:
            out[k] = f"N={n}: {_reason(k, ev, need)}"
    return out


def footnotes(rows: list[dict[str, Any]], keys: list[str], mark: str = "*") -> list[str]:
    """One line per distinct caveat among ``rows`` for the ``keys`` a table shows."""
    seen: dict[str, list[str]] = {}
    for r in rows:
        for k, why in caveats(r, keys).items():
            seen.setdefault(why, [])
            if k not in seen[why]:
                seen[why].append(k)
    return [f"{mark} {', '.join(ks)} — {why}" for why, ks in seen.items()]
