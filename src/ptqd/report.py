"""``ptqd report RUN``: plots of a run's noise statistics and bit schedule, and a markdown summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ptqd.correction.mixed import CRITERIA, DEFAULT_CRITERION, describe_schedule
from ptqd.correction.stats import NoiseStats, load_stats
from ptqd.errors import PtqdError
from ptqd.io import atomic_path, check_output, dir_with, json_with, text_starting, write_json

# a report directory ptqd wrote: its report.md or run.json
REPORT_DIR = dir_with(("report.md", text_starting("# ptqd run")), ("run.json", json_with("config", "summary")))


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


def plot_r2(stats: NoiseStats, out: Path, prefix: str) -> Path | None:
    """Per step, the share of the quantization error each correction model removes (R²), on held-out
    trajectories (solid) and in-sample (dashed), a panel per bit-width, beside k_t and r_t."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held, fit_ = stats.r2("heldout"), stats.r2("fit")
    if not fit_:
        return None
    t = np.asarray(stats.timesteps)
    fig, axes = plt.subplots(2, len(stats.bits), figsize=(6 * len(stats.bits), 7), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]})
    for i, b in enumerate(stats.bits):
        ax = axes[0, i]
        for j, model in enumerate(sorted(fit_)):
            color = f"C{j}"
            if model in held:
                ax.plot(t, held[model][i], color=color, label=f"{model} (held out)")
            ax.plot(t, fit_[model][i], "--", color=color, alpha=0.6, label=f"{model} (in-sample)" if model not in held else None)
        ax.axhline(0, color="k", lw=0.8)
        lo = min(-0.2, float(np.nanmin([v[i].min() for v in (held or fit_).values()])))
        ax.set_ylim(max(lo, -1.5), 1.02)
        ax.set_title(f"A{b}: share of E|ε̂ − ε|² removed (R²)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        a2 = axes[1, i]
        a2.plot(t, stats.k[i], label="k_t")
        a2.plot(t, stats.r[i], label="r_t")
        a2.set_xlabel("timestep t")
        a2.invert_xaxis()
        a2.grid(alpha=0.3)
        a2.legend(fontsize=7)
    fig.suptitle(_title(stats) + (f", held out N={stats.heldout.num_samples}" if stats.heldout is not None else ""))
    path = out / f"{prefix}_r2.png"
    _save(fig, path)
    return path


def _budget_section(run, stats: NoiseStats, sampler, run_dir: Path, out: Path, prefix: str) -> tuple[list[str], Path | None]:
    """The predicted cost/error curve of the budgeted criterion for the run's default correction, with
    the measured MSE to FP of the run's evaluated samples of this sampler (relative to its all-high run)."""
    from ptqd.compare import find_samples
    from ptqd.correction.apply import budget_plan, has_cached_contributions
    from ptqd.correction.corrector import parse_parts
    from ptqd.metrics.fidelity import metrics_path
    from ptqd.sampling import load_samples

    parts = parse_parts("all" if run.config.get("method") == "ptqd" else "none")
    measured = has_cached_contributions(run, stats, parts)
    try:  # the measured step contributions when `ptqd sample --fidelity-budget` has cached them, else the free prediction
        plan = budget_plan(run, stats, sampler, parts, 1.5, propagation="measured" if measured else "gaussian")
    except PtqdError as e:
        return [f"budgeted mixed precision: {e}", ""], None
    cfg = 2 if stats.meta.get("guidance") not in (None, 1.0) else 1
    measured, base = [], None
    for f in find_samples(run_dir):
        mfile = metrics_path(f)
        if not mfile.is_file():
            continue
        c = load_samples(f).config
        if (c.get("steps"), c.get("scheduler")) != (sampler.steps, sampler.scheduler) or tuple(c.get("correction") or ()) != parts:
            continue
        mse = read_mse(mfile)
        if mse is None or not c.get("sampling_bops"):
            continue
        measured.append({"gbops": c["sampling_bops"] / cfg / 1e9, "mse": mse, "label": f.stem, "high": c.get("act_bits") == max(stats.bits)})
        if measured[-1]["high"]:
            base = mse
    points = [{**m, "relative_mse": m["mse"] / base} for m in measured] if base else []
    png = plot_budget_curve(plan["curve"], points, out / f"{prefix}_budget.png", tolerance=1.5,
                            title=f"{_title(stats)}: predicted MSE to FP against GBOPs (correction {','.join(parts) or 'none'})")
    c = plan["chosen"]
    lines = [
        f"budgeted mixed precision (`--fidelity-budget 1.5`, correction {','.join(parts) or 'none'}): "
        f"{describe_schedule(plan['schedule'])}; predicted MSE to FP {c['relative']:.2f}× the all-A{max(stats.bits)} run's at "
        f"{c['bops'] * cfg / 1e9:.1f} GBOPs per image ({c['low_steps']} low-bit steps; {plan['propagation']} propagation)"
        + ("" if points else "; sample and `ptqd evaluate --against FP` the run at A8 and at other budgets to add measured points"),
        "",
    ]
    return lines, png


def read_mse(metrics_file: Path) -> float | None:
    """The paired MSE to FP in a metrics file of `ptqd evaluate --against` (its metrics are at the top level)."""
    import json

    try:
        data = json.loads(Path(metrics_file).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    mse = data.get("mse") if isinstance(data, dict) else None
    return float(mse) if isinstance(mse, (int, float)) and not isinstance(mse, bool) else None


def _title(stats: NoiseStats) -> str:
    m = stats.meta
    g = f" g {m['guidance']:g}" if m.get("guidance") else ""
    return f"W{m.get('weight_bits')} {m.get('scheduler')} {m.get('steps')} steps eta {m.get('eta')}{g}, N={m.get('num_samples')}"


def write_report(run_dir: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """report.md + PNGs for every noise-statistics file of the run. ``out`` (default RUN/report) is
    checked first: a new or empty directory or an earlier report; any other directory only with ``overwrite``."""
    from ptqd.correction.apply import calibrated_bits, schedule_for
    from ptqd.correction.mixed import snr_table
    from ptqd.runs import load_run
    from ptqd.sampling import SamplerConfig, make_scheduler

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    check_output(out, kind="dir", overwrite=overwrite, ours=REPORT_DIR, option="--out" if out != run_dir / "report" else "report directory")
    run = load_run(run_dir)
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
        r2_png = plot_r2(stats, out, prefix)
        lines += [f"## {_title(stats)}", "", f"file `{f.name}`, seed {m.get('seed')}, k clamped at 0: {m.get('clamp_k')}, μ of: {m.get('mean_of')}", ""]
        for c, sch in schedules.items():
            mark = " (default, plotted)" if c == DEFAULT_CRITERION else ""
            lines += [f"mixed-precision schedule, criterion {c}{mark}: {describe_schedule(sch)}", ""]
        from ptqd.correction.apply import guards_of
        from ptqd.correction.guard import describe_guard

        guards = guards_of(run, stats)
        if guards:
            lines += ["Final-sample guards fitted for these statistics (λ per block of steps: the share of the correction kept):", ""]
            for e in guards:
                k = e.get("key") or {}
                sched = sorted(set((k.get("schedule") or {}).values()))
                lines.append(f"- correction {','.join(k.get('parts') or [])}, activation bits {'/'.join(map(str, sched))}: "
                             + describe_guard(e["guard"]))
            lines.append("")
        if len(stats.bits) > 1:
            budget_lines, budget_png = _budget_section(run, stats, sampler, run_dir, out, prefix)
            lines += budget_lines
            pngs += [budget_png] if budget_png else []
        if r2_png is not None:
            pngs.append(r2_png)
            which = "heldout" if stats.r2("heldout") else "fit"
            lines += [f"Share of the quantization error each correction model removes (R², mean over steps; "
                      f"{'held-out trajectories, seed ' + str(m.get('heldout_seed')) if which == 'heldout' else 'in-sample'}):", "",
                      "| bits | " + " | ".join(stats.r2(which)) + " |", "|---|" + "---|" * len(stats.r2(which))]
            for i, b in enumerate(stats.bits):
                lines.append(f"| A{b} | " + " | ".join(f"{v[i].mean():+.3f}" for v in stats.r2(which).values()) + " |")
            lines.append("")
        else:
            lines += ["These statistics predate the correction models (no joint moments): `ptqd stats RUN` collects them again.", ""]
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
        if s.config.get("guard"):
            from ptqd.correction.guard import describe_guard

            lines += [describe_guard(s.config["guard"]), ""]
        elif "guard" in s.config and s.config.get("correction"):
            lines += ["correction applied as it is (no guard: the paper's PTQD)", ""]
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

