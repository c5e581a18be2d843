"""Issue 5: the demo (quick), run reports and `ptqd compare`."""

import json
import os

import numpy as np
import pytest

from ptqd.cli import main
from ptqd.compare import compare, find_samples
from ptqd.sampling import load_samples

METHODS = ["FP32", "naive", "Q-Diffusion", "PTQD", "PTQD mixed"]
ROWS = [("FP32", "W32A32")] + [(m, f"W4A{b}") for b in (8, 4) for m in ("naive", "Q-Diffusion", "PTQD")] + [("PTQD mixed", "W4A4/8")]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_demo_quick_table_and_report(demo_dir, capsys):
    result = json.loads((demo_dir / "demo.json").read_text())
    rows = {(r["name"], r["bits"]): r for r in result["rows"]}
    assert list(rows) == ROWS
    for r in rows.values():
        for k in ("psnr", "ssim", "mse", "fd_fp", "fd_fp_floor", "fd_fp_ratio", "fd", "sfd", "is", "precision", "recall",
                  "accuracy", "gbops", "size_mb", "sample_s"):
            assert r[k] is not None and np.isfinite(r[k]), (r["name"], k)
    fp, ptqd8, ptqd4 = rows[("FP32", "W32A32")], rows[("PTQD", "W4A8")], rows[("PTQD", "W4A4")]
    mixed = rows[("PTQD mixed", "W4A4/8")]
    # quantized rows are cheaper and smaller than FP; mixed precision (A4 on most steps) is cheaper still
    assert ptqd8["gbops"] < fp["gbops"] / 10
    assert mixed["gbops"] < ptqd8["gbops"] and ptqd4["gbops"] < mixed["gbops"]
    assert ptqd8["size_mb"] < fp["size_mb"] / 5
    # paired metrics: FP against itself is exact, every quantized row departs from it, A4 more than A8
    assert fp["mse"] == 0 and fp["ssim"] == 1 and fp["fd_fp"] == pytest.approx(0, abs=1e-6) and fp["identical"] == 40
    assert all(r["mse"] > 0 and r["psnr"] < fp["psnr"] for k, r in rows.items() if k[0] != "FP32")
    assert rows[("naive", "W4A4")]["psnr"] < rows[("naive", "W4A8")]["psnr"]
    assert len({r["fd_fp_floor"] for r in rows.values()}) == 1  # one floor: FP seed 0 vs FP seed 1
    assert "A4" in mixed["bit_schedule"]
    report = (demo_dir / "report.md").read_text()
    for name, bits in ROWS:
        assert f"| {name} | {bits} |" in report
    header = next(line for line in report.splitlines() if line.startswith("| method"))
    assert header.index("PSNR to FP") < header.index("FD→FP / floor") < header.index("| FD |")
    assert "N=40" in report  # small-sample caveats stated beside the numbers
    assert "comparison.png" in report and (demo_dir / "comparison.png").stat().st_size > 1000
    pngs = [line.split("(")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert len(pngs) >= 3 and all((demo_dir / p).is_file() for p in pngs)
    # every method used the same seeds and labels: the grids are comparable
    labels = [load_samples(demo_dir / "samples" / f"{k}.npz").labels for k in ("fp32", "naive_w4a8", "ptqd_w4a4", "ptqd_mixed")]
    assert all(np.array_equal(labels[0], lab) for lab in labels[1:])
    assert load_samples(demo_dir / "samples" / "fp32_floor.npz").config["seed"] == 1
    for key in ("fp32", "qdiff_w4a4", "ptqd_mixed"):  # one metrics file per samples file
        m = json.loads((demo_dir / "samples" / f"{key}.metrics.json").read_text())
        assert m["samples"].endswith(f"{key}.npz") and m["against"].endswith("fp32.npz")
    cfg = json.loads((demo_dir / "config.json").read_text())
    assert cfg["seed"] == 0 and cfg["quick"] is True and cfg["sampler"]["steps"] == 10


def test_demo_resumes_without_redoing_work(demo_dir):
    before = {f.name: f.stat().st_mtime_ns for f in (demo_dir / "samples").glob("*.npz")}
    first = json.loads((demo_dir / "demo.json").read_text())["rows"]
    assert main(["demo", "--quick", "--out", str(demo_dir), "--no-progress"]) == 0
    after = {f.name: f.stat().st_mtime_ns for f in (demo_dir / "samples").glob("*.npz")}
    assert before == after  # samples reused, not regenerated
    second = json.loads((demo_dir / "demo.json").read_text())["rows"]
    assert [r["fd"] for r in first] == [r["fd"] for r in second]


def test_compare_runs_and_samples(demo_dir, tmp_path, capsys):
    run = demo_dir / "runs" / "ptqd_w4"
    # a run with an evaluated samples file inside it, one without, and a bare samples file
    assert main(["sample", str(run), "--num", "20", "--steps", "10", "--out", str(run / "extra.npz"), "--no-progress"]) == 0
    assert main(["evaluate", str(run / "extra.npz")]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert main(["compare", str(run), str(demo_dir / "runs" / "naive_w4"), str(demo_dir / "samples" / "fp32.npz"),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ptqd_w4" in text and "naive_w4" in text and "fp32.npz" in text
    rows = json.loads(out.with_suffix(".json").read_text())
    assert len(rows) == 3
    extra = next(r for r in rows if r["name"] == "extra.npz")
    metrics = json.loads((run / "extra.metrics.json").read_text())
    assert extra["fd"] == pytest.approx(metrics["fd"]) and extra["num"] == 20
    assert extra["correction"] == "cnc,bc,vsc" and extra["bits"].startswith("W4A8")
    assert next(r for r in rows if r["run"] == "naive_w4")["name"] == "(no samples)"
    assert out.with_suffix(".png").is_file() and "![quality vs BOPs]" in out.with_suffix(".md").read_text()
    assert extra["seed"] == 0 and extra["steps"] == 10 and extra["sampler_differs"] is False
    assert find_samples(run) == [run / "extra.npz"]
    os.remove(run / "extra.npz")


def test_compare_and_report_errors(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "neither a run directory nor a samples .npz" in capsys.readouterr().err
    (tmp_path / "notarun").mkdir()
    assert main(["compare", str(tmp_path / "notarun")]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(Exception):
        compare([])


def test_report_includes_samples_and_metrics(demo_dir, tmp_path, capsys):
    run = demo_dir / "runs" / "ptqd_w4"
    assert main(["sample", str(run), "--num", "20", "--steps", "10", "--out", str(run / "s" / "a.npz"), "--no-progress"]) == 0
    out = tmp_path / "rep"
    assert main(["report", str(run), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Samples" in text and "s/a.npz" in text and "| fd |" in text  # evaluated on the fly
    assert "N=20" in text  # with its small-sample caveats
    assert (out / "samples_s_a.png").is_file()
    assert any(p.name.endswith("_stats.png") for p in out.iterdir())
