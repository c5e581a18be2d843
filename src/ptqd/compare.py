"""``ptqd compare RUN1 RUN2 …``: one table (and a plot) of several runs and their evaluated samples.

Arguments are quantization run directories or samples ``.npz`` files (e.g. FP32 samples). Each run
contributes one row per samples file found inside it (or one row without metrics when it has none).
Metrics come from the ``S.metrics.json`` that ``ptqd evaluate`` wrote beside each ``S.npz`` (paired
fidelity to FP when it was evaluated ``--against`` FP samples); samples that were never evaluated are
evaluated on the fly with the bundled classifier when the images fit it. Every row shows the sampler,
seed and N it was made with; rows whose sampler differs from the first row's are marked ``≠``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ptqd.errors import PtqdError
from ptqd.io import atomic_path, check_output, json_list, text_starting, write_json

METRIC_KEYS = (
    "psnr", "psnr_std", "ssim", "ssim_std", "mse", "mse_std", "fd_fp", "fd_fp_floor", "fd_fp_ratio",
    "fd", "sfd", "fid", "sfid", "is", "precision", "recall", "accuracy", "num_samples", "evaluator",
)


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
    """The metrics ``ptqd evaluate`` (or the demo) wrote for ``samples``, if any (``S.metrics.json``; a
    folder's ``metrics.json`` from older versions when it names this file)."""
    from ptqd.metrics.fidelity import metrics_path

    candidates = [metrics_path(samples), samples.parent / "metrics.json"]
    candidates += sorted(samples.parent.glob("*metrics*.json"))
    for c in candidates:
        if not c.is_file():
            continue
        try:
            m = json.loads(c.read_text())
        except json.JSONDecodeError:
            continue
        named = m.get("samples")
        if c == metrics_path(samples) or (named and Path(named).name == samples.name):
            return m
    return None


def describe_samples(path: Path, evaluate_missing: bool = True) -> dict[str, Any]:
    """Sampler, correction, activation bits and metrics of one samples file."""
    from ptqd.sampling import load_samples

    s = load_samples(path)
    c = s.config
    parts = c.get("correction")
    d: dict[str, Any] = {
        "samples": str(path),
        "model": c.get("model", "?"),
        "sampler": describe_sampler(c),
        "scheduler": c.get("scheduler"),
        "steps": c.get("steps"),
        "eta": c.get("eta") if c.get("scheduler") == "ddim" else None,
        "guidance": c.get("guidance"),
        "seed": c.get("seed"),
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


def describe_sampler(c: dict[str, Any]) -> str:
    """``DDIM 50 steps, eta 1.0, guidance 3.0`` from a samples config (seed left out)."""
    text = f"{str(c.get('scheduler', '?')).upper()} {c.get('steps', '?')} steps"
    if c.get("scheduler") == "ddim":
        text += f", eta {c.get('eta', '?')}"
    if c.get("guidance") not in (None, 1.0):
        text += f", guidance {c.get('guidance')}"
    return text


def mark_samplers(rows: list[dict[str, Any]]) -> None:
    """Set ``sampler_differs`` on rows whose sampler (scheduler, steps, eta, guidance) is not the first
    sampled row's: their numbers are not comparable with it."""
    sampled = [r for r in rows if r.get("sampler")]
    if not sampled:
        return
    first = sampled[0]["sampler"]
    for r in sampled:
        r["sampler_differs"] = r["sampler"] != first


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
    mark_samplers(rows)
    return rows


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    m = d.pop("metrics", None) or {}
    return {**d, **{k: m.get(k) for k in METRIC_KEYS}}


COLUMNS = [
    ("run", "run"), ("name", "samples"), ("method", "method"), ("bits", "bits"), ("correction", "correction"),
    ("act_bits", "act bits"), ("sampler", "sampler"), ("seed", "seed"), ("num", "N"), ("psnr", "PSNR to FP dB"),
    ("ssim", "SSIM to FP"), ("fd_fp", "FD→FP"), ("fd_fp_ratio", "FD→FP / floor"), ("fd", "FD"), ("sfd", "sFD"),
    ("is", "IS"), ("precision", "prec."), ("recall", "recall"), ("accuracy", "acc."), ("gbops_image", "GBOPs / image"),
    ("size_mb", "size MB"), ("calib_s", "calib s"),
]


def format_compare(rows: list[dict[str, Any]]) -> str:
    """The markdown table; ``*`` marks numbers resting on too few samples, ``≠`` a sampler that differs
    from the first row's (both explained below the table)."""
    from ptqd.metrics.caveats import caveats, footnotes

    keys = [k for k, _ in COLUMNS]
    shown = [(k, h) for k, h in COLUMNS if k in ("run", "name") or any(r.get(k) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h in shown) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        flagged = caveats(r, keys)
        cells = []
        for k, _ in shown:
            v = r.get(k)
            if v is None:
                cells.append("–")
            elif isinstance(v, float):
                cells.append(f"{v:.3f}" if k in ("precision", "recall", "accuracy", "ssim") else f"{v:.2f}")
            else:
                cells.append(str(v))
            if k in flagged:
                cells[-1] += "*"
            if k == "sampler" and r.get("sampler_differs"):
                cells[-1] += " ≠"
        lines.append("| " + " | ".join(cells) + " |")
    notes = footnotes(rows, keys)
    if any(r.get("sampler_differs") for r in rows):
        first = next(r["sampler"] for r in rows if r.get("sampler"))
        notes.append(f"≠ sampled differently from the first row ({first}): not comparable with it")
    return "\n".join(lines + ([""] + notes if notes else []))


def plot_compare(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """The quality/cost trade-off at a glance, one point per evaluated row: PSNR to FP against BOPs per
    image (when rows were evaluated against FP samples) beside FD to real data against BOPs."""
    panels = [(k, label) for k, label in (("psnr", "PSNR to FP, dB (higher: closer to FP)"), ("fd", "FD to real data (lower is better)"))
              if any(r.get(k) is not None and r.get("gbops_image") for r in rows)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        pts = [r for r in rows if r.get(key) is not None and r.get("gbops_image")]
        for i, r in enumerate(pts):
            ax.scatter(r["gbops_image"], r[key], color=f"C{i % 10}")
            ax.annotate(f"{r['run']}/{r['name']}", (r["gbops_image"], r[key]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("GBOPs per image (whole sampling run)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def check_compare_output(out: str | Path, overwrite: bool = False) -> Path:
    """Check before any work that ``out``.md, .json and .png can be written: new, or written by an
    earlier ``ptqd compare`` (a .png only beside its .md); anything else only with ``overwrite``."""
    out = Path(out)
    md = out.with_suffix(".md")
    ours_md = text_starting("# ptqd compare")
    check_output(md, ".md", overwrite=overwrite, ours=ours_md)
    check_output(out.with_suffix(".json"), ".json", overwrite=overwrite, ours=json_list)
    check_output(out.with_suffix(".png"), ".png", overwrite=overwrite, ours=lambda p: ours_md(md))
    return out


def write_compare(rows: list[dict[str, Any]], out: Path, overwrite: bool = False) -> Path:
    """``out``.md (table + plot) and ``out``.json (checked as :func:`check_compare_output` says)."""
    out = check_compare_output(out, overwrite)
    md = out.with_suffix(".md")
    png = plot_compare(rows, out.with_suffix(".png"))
    text = "# ptqd compare\n\n" + format_compare(rows) + "\n"
    if png is not None:
        text += f"\n![quality vs BOPs]({png.name})\n"
    with atomic_path(md) as tmp:
        tmp.write_text(text)
    write_json(out.with_suffix(".json"), rows)
    return md
