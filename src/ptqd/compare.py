"""``ptqd compare RUN1 RUN2 …``: one table (and a plot) of several runs and their evaluated samples.

Arguments are quantization run directories or samples ``.npz`` files (e.g. FP32 samples). Each run
contributes one row per samples file found inside it (or one row without metrics when it has none).
Metrics come from the ``metrics.json`` that ``ptqd evaluate`` wrote beside the samples; samples that
were never evaluated are evaluated on the fly with the bundled classifier when the images fit it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ptqd.errors import PtqdError
from ptqd.io import atomic_path, write_json

METRIC_KEYS = ("fd", "sfd", "is", "precision", "recall", "accuracy", "num_samples")


def find_samples(run_dir: Path) -> list[Path]:
    """Samples ``.npz`` files under a run directory (statistics partials and calibration data excluded)."""
    out = []
    for f in sorted(Path(run_dir).rglob("*.npz")):
        if f.name.endswith(".partial.npz") or f.name.startswith("."):
            continue
        try:
            import numpy as np

            with np.load(f, allow_pickle=False) as z:
                if "images" in z.files:
                    out.append(f)
        except Exception:  # not a samples file: ignore it here, `ptqd evaluate` reports broken files
            continue
    return out


def _metrics_for(samples: Path) -> dict[str, Any] | None:
    """The metrics ``ptqd evaluate`` (or the demo) wrote for ``samples``, if any."""
    candidates = [samples.with_suffix(".metrics.json"), samples.parent / "metrics.json"]
    candidates += sorted(samples.parent.glob("*metrics*.json"))
    for c in candidates:
        if not c.is_file():
            continue
        try:
            m = json.loads(c.read_text())
        except json.JSONDecodeError:
            continue
        named = m.get("samples")
        if c == samples.with_suffix(".metrics.json") or (named and Path(named).name == samples.name):
            return m
    return None


def describe_samples(path: Path, evaluate_missing: bool = True) -> dict[str, Any]:
    """Sampler, correction, activation bits and metrics of one samples file."""
    from ptqd.sampling import load_samples

    s = load_samples(path)
    c = s.config
    sampler = f"{str(c.get('scheduler', '?')).upper()} {c.get('steps', '?')} steps"
    if c.get("scheduler") == "ddim":
        sampler += f", eta {c.get('eta', '?')}"
    if c.get("guidance") not in (None, 1.0):
        sampler += f", guidance {c.get('guidance')}"
    sampler += f", seed {c.get('seed', '?')}"
    parts = c.get("correction")
    d: dict[str, Any] = {
        "samples": str(path),
        "model": c.get("model", "?"),
        "sampler": sampler,
        "correction": ",".join(parts) if parts else "none",
        "act_bits": c.get("bit_schedule") or c.get("act_bits") or "–",
        "gbops_image": c["sampling_bops"] / 1e9 if c.get("sampling_bops") else None,
        "num": len(s.images),
    }
    m = _metrics_for(path)
    if m is None and evaluate_missing:
        from ptqd.metrics import evaluate

        try:
            m = evaluate(s.images, s.labels)
        except PtqdError as e:
            d["metrics_note"] = str(e)
    d["metrics"] = m
    return d


def compare(paths: list[str | Path]) -> list[dict[str, Any]]:
    """One row per (run, samples file); ``paths`` are run directories or samples ``.npz`` files."""
    from ptqd.runs import read_run_info

    rows: list[dict[str, Any]] = []
    if not paths:
        raise PtqdError("give one or more run directories or samples .npz files to compare")
    for p in map(Path, paths):
        if p.is_file() and p.suffix == ".npz":
            d = describe_samples(p)
            rows.append({"run": p.parent.name, "name": p.name, "method": "–", "bits": "–", **_flatten(d)})
            continue
        if not p.is_dir():
            raise PtqdError(f"{p} is neither a run directory nor a samples .npz file")
        info = read_run_info(p)
        base = {
            "run": p.name, "method": info["method"], "bits": info["bits"], "size_mb": info["size_mb"],
            "gbops_forward": info["gbops_forward"], "calib_s": info["calib_s"],
        }
        files = find_samples(p)
        if not files:
            rows.append({**base, "name": "(no samples)"})
        for f in files:
            rows.append({**base, "name": str(f.relative_to(p)), **_flatten(describe_samples(f))})
    return rows


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    m = d.pop("metrics", None) or {}
    return {**d, **{k: m.get(k) for k in METRIC_KEYS}}


COLUMNS = [
    ("run", "run"), ("name", "samples"), ("method", "method"), ("bits", "bits"), ("correction", "correction"),
    ("act_bits", "act bits"), ("fd", "FD"), ("sfd", "sFD"), ("is", "IS"), ("precision", "prec."),
    ("recall", "recall"), ("accuracy", "acc."), ("num_samples", "N"), ("gbops_image", "GBOPs / image"),
    ("size_mb", "size MB"), ("calib_s", "calib s"),
]


def format_compare(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for k, _ in COLUMNS:
            v = r.get(k)
            if v is None:
                cells.append("–")
            elif isinstance(v, float):
                cells.append(f"{v:.3f}" if k in ("precision", "recall", "accuracy") else f"{v:.2f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_compare(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """FD against BOPs per image, one point per evaluated row: the quality/cost trade-off at a glance."""
    pts = [r for r in rows if r.get("fd") is not None and r.get("gbops_image")]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(pts):
        ax.scatter(r["gbops_image"], r["fd"], color=f"C{i % 10}")
        ax.annotate(f"{r['run']}/{r['name']}", (r["gbops_image"], r["fd"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("GBOPs per image (whole sampling run)")
    ax.set_ylabel("FD (lower is better)")
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_compare(rows: list[dict[str, Any]], out: Path) -> Path:
    """``out``.md (table + plot) and ``out``.json."""
    out = Path(out)
    md = out.with_suffix(".md")
    png = plot_compare(rows, out.with_suffix(".png"))
    text = "# ptqd compare\n\n" + format_compare(rows) + "\n"
    if png is not None:
        text += f"\n![FD vs BOPs]({png.name})\n"
    with atomic_path(md) as tmp:
        tmp.write_text(text)
    write_json(out.with_suffix(".json"), rows)
    return md
