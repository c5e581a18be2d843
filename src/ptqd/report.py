"""``ptqd report RUN``: plots of a run's noise statistics and bit schedule, and a markdown summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ptqd.correction.mixed import CRITERIA, DEFAULT_CRITERION, describe_schedule
from ptqd.correction.stats import NoiseStats, load_stats
from ptqd.errors import PtqdError
from ptqd.io import atomic_path, write_json


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_stats(stats: NoiseStats, out: Path, prefix: str) -> list[Path]:
    """k_t, r_t, σ^q_t, μ_t per channel (one panel each, a line per bit-width) → ``prefix``_stats.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(stats.timesteps)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for i, b in enumerate(stats.bits):
        color = f"C{i}"
        axes[0, 0].plot(t, stats.k[i], color=color, label=f"A{b} k (used)")
        axes[0, 0].plot(t, stats.k_raw[i], "--", color=color, alpha=0.5, label=f"A{b} k (fit)")
        axes[0, 1].plot(t, stats.r[i], color=color, label=f"A{b}")
        axes[1, 0].semilogy(t, stats.sigma[i], color=color, label=f"A{b} σ^q")
        for c in range(stats.mu.shape[-1]):
            axes[1, 1].plot(t, stats.mu[i, :, c], color=color, alpha=1.0 - 0.25 * c, label=f"A{b} ch{c}")
    axes[1, 0].semilogy(t, np.sqrt(stats.fp_var), "k:", label="FP output std")
    titles = ["k_t (correlated part)", "r_t (corr. of Δε with ε)", "σ^q_t (residual std)", "μ_t per channel (bias)"]
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("timestep t")
        ax.invert_xaxis()
    fig.suptitle(_title(stats))
    path = out / f"{prefix}_stats.png"
    _save(fig, path)
    return [path]


def plot_snr(table: dict, schedule: dict[int, int] | None, out: Path, prefix: str, title: str) -> Path:
    """SNR^F(t), SNR^F(t_prev) and SNR^Q_b(t) per bit-width, and the chosen bit schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table["t"]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    a1.semilogy(t, table["snr_fp"], "k-", label="SNR^F(t)")
    a1.semilogy(t, table["snr_fp_prev"], "k:", label="SNR^F(previous step)")
    for b, v in table["snr_q"].items():
        line = a1.semilogy(t, v, label=f"SNR^Q A{b} (snr)")[0]
        a1.semilogy(t, table["snr_q_unscaled"][b], "--", color=line.get_color(), label=f"SNR^Q A{b} (snr-unscaled)")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    a1.set_title("signal-to-noise ratio per step")
    if schedule:
        a2.step(list(schedule), list(schedule.values()), where="mid")
        a2.set_yticks(sorted(set(schedule.values())))
    a2.set_ylabel("act bits")
    a2.set_xlabel("timestep t")
    a2.invert_xaxis()
    a2.grid(alpha=0.3)
    fig.suptitle(title)
    path = out / f"{prefix}_snr.png"
    _save(fig, path)
    return path


def plot_budget_curve(
    curve: list[dict],
    measured: list[dict] | None,
    path: str | Path,
    title: str | None = None,
    tolerance: float | None = None,
) -> Path:
    """Predicted relative final MSE against GBOPs along a :func:`~ptqd.correction.mixed.budget_curve`
    (line + markers), measured points ``{"gbops", "relative_mse", "label"}`` as a second series, and
    ``tolerance`` as a dashed line → the PNG ``path`` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curve:
        raise PtqdError("the budget curve is empty: nothing to plot")
    try:
        x = np.array([float(e["bops"]) / 1e9 for e in curve])
        y = np.array([float(e["relative"]) for e in curve])
        pts = [(float(m["gbops"]), float(m["relative_mse"]), str(m.get("label", ""))) for m in (measured or [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise PtqdError(f"budget curve entries need bops and relative, measured points gbops and relative_mse: {exc}") from exc
    fig, ax = plt.subplots(figsize=(8, 5))
    shown = np.isfinite(y)
    ax.plot(x[shown], y[shown], "o-", ms=4, label="predicted (budget curve)")
    for e, xi, yi in ((curve[0], x[0], y[0]), (curve[-1], x[-1], y[-1])):
        if np.isfinite(yi):
            ax.annotate(f"{e.get('low_steps', '?')} low-bit steps", (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize=7)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "s", ms=7, color="C3", label="measured")
        for px, py, lab in pts:
            if lab:
                ax.annotate(lab, (px, py), textcoords="offset points", xytext=(5, -10), fontsize=7, color="C3")
    if tolerance is not None:
        ax.axhline(float(tolerance), color="k", ls="--", lw=0.8, label=f"tolerance {float(tolerance):g}×")
    values = np.concatenate([y[shown], [p[1] for p in pts]])
    if values.size and np.all(values > 0) and values.max() / values.min() > 20:
        ax.set_yscale("log")
    ax.set_xlabel("GBOPs per sampling run")
    ax.set_ylabel("final MSE relative to all-high-bit schedule")
    ax.set_title(title or "budgeted mixed precision: predicted error against cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    _save(fig, path)
    return path


def _title(stats: NoiseStats) -> str:
    m = stats.meta
    g = f" g {m['guidance']:g}" if m.get("guidance") else ""
    return f"W{m.get('weight_bits')} {m.get('scheduler')} {m.get('steps')} steps eta {m.get('eta')}{g}, N={m.get('num_samples')}"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """report.md + PNGs for every noise-statistics file of the run."""
    from ptqd.correction.apply import calibrated_bits, schedule_for
    from ptqd.correction.mixed import snr_table
    from ptqd.runs import load_run
    from ptqd.sampling import SamplerConfig, make_scheduler

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(run_dir.glob("noise_stats_*.safetensors"))
    cfg, summary = run.config, run.summary
    q = cfg["quant"]
    lines = [
        f"# ptqd run {run_dir.name}",
        "",
        f"model {cfg['model']} (fingerprint {cfg['model_fingerprint']}), method **{cfg['method']}**, "
        f"W{q['weight_bits']}A{q['act_bits']} (calibrated act bits {calibrated_bits(run)}), ptqd {cfg.get('ptqd')}",
        "",
    ]
    if summary.get("bops"):
        b = summary["bops"]
        lines += [f"BOPs per forward {b['bops'] / 1e9:.2f} G ({b['bops_saving']}× fewer than FP), size {summary['size']['bytes'] / 1e6:.2f} MB", ""]
    if not files:
        lines += ["No noise statistics in this run: collect them with `ptqd stats RUN` (or quantize with --method ptqd).", ""]
    for f in files:
        stats = load_stats(f)
        m = stats.meta
        prefix = f.stem
        sampler = SamplerConfig(m["scheduler"], m["steps"], m["eta"] if m["eta"] is not None else 1.0, m.get("guidance") or 1.0)
        sched = make_scheduler(run.base, sampler.scheduler, sampler.steps)
        table = snr_table(stats, sched.alphas_cumprod.numpy(), sched.config.num_train_timesteps)
        schedules = {c: schedule_for(run, stats, sampler, criterion=c) for c in CRITERIA} if len(stats.bits) > 1 else {}
        schedule = schedules.get(DEFAULT_CRITERION)
        pngs = plot_stats(stats, out, prefix)
        pngs.append(plot_snr(table, schedule, out, prefix, _title(stats)))
        lines += [f"## {_title(stats)}", "", f"file `{f.name}`, seed {m.get('seed')}, k clamped at 0: {m.get('clamp_k')}, μ of: {m.get('mean_of')}", ""]
        for c, sch in schedules.items():
            mark = " (default, plotted)" if c == DEFAULT_CRITERION else ""
            lines += [f"mixed-precision schedule, criterion {c}{mark}: {describe_schedule(sch)}", ""]
        lines += ["| bits | t | k | k fit | r | σ^q | rel. error | μ |", "|---|---|---|---|---|---|---|---|"]
        for b in stats.bits:
            rows = stats.table(b)
            shown = rows[:: max(1, len(rows) // 8)]
            for row in shown + ([rows[-1]] if rows and shown[-1] is not rows[-1] else []):
                mu = ", ".join(f"{v:+.4f}" for v in row["mu"])
                lines.append(
                    f"| A{b} | {row['t']} | {row['k']:.4f} | {row['k_raw']:+.4f} | {row['r']:+.3f} | {row['sigma']:.4f} | "
                    f"{row['rel_err']:.3f} | {mu} |"
                )
        lines += [""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
        worst = int(np.argmax(stats.rel_err.max(0)))
        lines += [
            f"Largest relative error at t={stats.timesteps[worst]} ({stats.rel_err.max(0)[worst]:.2f}); "
            "check that step before trusting its fit.",
            "",
        ]
    lines += _samples_section(run_dir, out)
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    write_json(out / "run.json", {"config": cfg, "summary": summary})
    return path


def _samples_section(run_dir: Path, out: Path) -> list[str]:
    """Metrics and a labelled grid of every samples file inside the run directory."""
    from ptqd.compare import describe_samples, find_samples
    from ptqd.images import save_grid
    from ptqd.sampling import load_samples

    files = find_samples(run_dir)
    lines = ["## Samples", ""]
    if not files:
        return lines + [
            f"No samples in {run_dir}: `ptqd sample {run_dir} --out {run_dir}/samples.npz` then "
            f"`ptqd evaluate {run_dir}/samples.npz` (then rerun `ptqd report`).",
            "",
        ]
    for f in files:
        d = describe_samples(f)
        s = load_samples(f)
        rel = f.relative_to(run_dir)
        png = save_grid(s.images, out / f"samples_{'_'.join(rel.with_suffix('').parts)}.png", labels=s.labels, title=str(rel))
        lines += [
            f"### `{rel}`", "",
            f"{d['sampler']}, seed {d['seed']}, {d['num']} images; correction {d['correction']}; activation bits {d['act_bits']}", "",
        ]
        m = d.get("metrics")
        if m:
            from ptqd.metrics import format_table
            from ptqd.metrics.evaluate import PAIRED_COLUMNS

            order = [*PAIRED_COLUMNS, "fd", "sfd", "fid", "sfid", "is", "precision", "recall", "accuracy", "num_samples"]
            keys = [k for k in order if m.get(k) is not None]
            lines += [format_table([{"name": rel.name, **m}], keys), ""]
            if m.get("against"):
                lines += [f"paired metrics against `{m['against']}`" + (f", floor `{m['floor']}`" if m.get("floor") else ""), ""]
        else:
            lines += [f"not evaluated: {d.get('metrics_note', f'run `ptqd evaluate {f}`')}", ""]
        lines += [f"![{png.stem}]({png.name})", ""]
    return lines

