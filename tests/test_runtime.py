"""Real low-bit execution: integer kernels against the simulated layers, packed checkpoints, damaged files, CLI."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from ptqd.cli import main
from ptqd.correction import StatsRequest, collect_stats
from ptqd.errors import PtqdError
from ptqd.models import load
from ptqd.models.zoo import zoo_path
from ptqd.quant import QuantConfig, QuantSpec
from ptqd.quant.layers import QuantLayer
from ptqd.quant.wrap import quant_layers
from ptqd.runs import export_run, quantize, save_run
from ptqd.runtime import IntLayer, export, integer_weight, load_checkpoint, measure_speed, read_manifest, set_kernel
from ptqd.runtime.kernels import KERNELS, cpu_features, cpu_has_vnni, kernel_for, supported_kernels
from ptqd.runtime.checkpoint import MANIFEST, WEIGHTS
from ptqd.runtime.pack import pack_nibbles, unpack_nibbles
from ptqd.sampling import SamplerConfig

SAMPLER = SamplerConfig(steps=4, eta=1.0, guidance=3.0, batch_size=4)


def test_pack_nibbles_roundtrip_and_limits():
    u = torch.tensor([0, 15, 7, 8, 1], dtype=torch.uint8)
    packed = pack_nibbles(u)
    assert packed.tolist() == [0 | 15 << 4, 7 | 8 << 4, 1]
    assert unpack_nibbles(packed, 5).tolist() == u.tolist()
    with pytest.raises(PtqdError, match="4 bits"):
        pack_nibbles(torch.tensor([16]))
    with pytest.raises(PtqdError, match="expected 3"):
        unpack_nibbles(packed[:2], 5)


# ------------------------------------------------------------------------------------------
# integer layers against the simulated QuantLayer


def _calibrated(fp, wbits, sym_w, split, adaround, act_sym=False, gen=None):
    layer = QuantLayer(fp, QuantSpec(wbits, sym_w, True, "minmax"), QuantSpec(8, act_sym), [4, 8], split=split)
    for wq, w in zip(layer.weight_quantizers, layer.weight_parts()):
        wq.calibrate(w)
        if adaround:  # AdaRound's decisions differ from nearest rounding: the integers must follow them
            wq.round_up = torch.rand(w.shape, generator=gen) > 0.5
    return layer



def _calibrate_acts(layer, x):
    """Min-max activation ranges of ``layer`` observed on ``x``."""
    for aq in layer.act_quantizers:
        aq.observing = True
    layer(x)
    for aq in layer.act_quantizers:
        aq.observing = False
        aq.calibrate_from_observed("minmax")

def _int_twin(layer, fp_meta):
    il = IntLayer(fp_meta, layer.weight_quantizers[0].spec, layer.act_quantizers[0].spec, [4, 8], split=layer.split)
    il.set_integer_weights([integer_weight(wq, w) for wq, w in zip(layer.weight_quantizers, layer.weight_parts())], layer.fp.bias)
    for a, b in zip(layer.act_quantizers, il.act_quantizers):
        b.load_state(a.state())
    return il


CASES = [  # kind, weight bits, symmetric weights, split, adaround, symmetric activations
    ("conv", 8, False, 0, False, False),
    ("conv", 4, False, 0, True, False),
    ("conv", 8, True, 24, True, True),
    ("conv", 4, True, 24, False, False),
    ("linear", 8, False, 0, True, False),
    ("linear", 4, False, 0, False, True),
]


@pytest.mark.parametrize("kind,wbits,sym_w,split,ada,sym_a", CASES)
@pytest.mark.parametrize("kernel", supported_kernels("cpu"))
def test_integer_layer_matches_simulated(kind, wbits, sym_w, split, ada, sym_a, kernel):
    g = torch.Generator().manual_seed(0)
    if kind == "conv":
        fp, meta = nn.Conv2d(48, 40, 3, padding=1), nn.Conv2d(48, 40, 3, padding=1, device="meta")
        x = torch.randn(3, 48, 9, 9, generator=g)
    else:
        fp, meta = nn.Linear(48, 40), nn.Linear(48, 40, device="meta")
        x = torch.randn(3, 7, 48, generator=g)
    with torch.no_grad():
        fp.weight[:, ::3] += 0.3  # skewed ranges: asymmetric 8-bit weights then need the offset term
    fp.requires_grad_(False)
    layer = _calibrated(fp, wbits, sym_w, split, ada, sym_a, g)
    _calibrate_acts(layer, x * 1.3)
    il = _int_twin(layer, meta)
    if wbits == 8 and not sym_w:
        assert (il.wd_0 != 0).any()
    set_kernel(kernel)
    try:
        for bits in (8, 4):
            for q in [*layer.act_quantizers, *il.act_quantizers]:
                q.set_bits(bits)
            ref, out = layer(x), il(x)
            # the integer sums are exact: only float summation order separates the two, and on the CPU
            # the fused input quantizer (x·(1/s) + z rounded) can put an activation within float rounding
            # of a .5 tie one step away: at most a few outputs move, by one input step
            off = (out - ref).abs() > 1e-5 * ref.abs().max()
            if kernel == "intmm":
                assert not off.any()
            else:
                assert off.float().mean() < 0.1  # a flipped input moves every output that reads it
                step = max(float(q.current_scale()) for q in layer.act_quantizers)
                assert (out - ref).abs().max() <= 2 * step * layer.quantized_weight().abs().max()
    finally:
        set_kernel("auto")
    assert torch.allclose(il.dequantized_weight(), layer.quantized_weight(), atol=1e-7)


def _worst_case_layer(kind, wbits, gen):
    """A layer whose u8·s8 products are as large as they get: most weights at the ends of their grid
    (±127 at 8 bits), inputs mostly at the top of theirs (255), all exactly on their grids (no
    rounding ties): adjacent pairs sum to 2·255·127 > 2**15, what saturating int16 kernels get wrong."""
    if kind == "conv":
        fp, meta = nn.Conv2d(32, 24, 3, padding=1), nn.Conv2d(32, 24, 3, padding=1, device="meta")
        shape = (2, 32, 6, 6)
    else:
        fp, meta = nn.Linear(64, 24), nn.Linear(64, 24, device="meta")
        shape = (2, 5, 64)
    top = 2 ** (wbits - 1) - 1
    with torch.no_grad():
        w = torch.randint(-top, top + 1, fp.weight.shape, generator=gen).float()
        w[torch.rand(w.shape, generator=gen) < 0.7] = top  # same sign: the pair sums add up
        fp.weight.copy_(w * 0.01)
    fp.requires_grad_(False)
    layer = _calibrated(fp, wbits, True, 0, False)
    q = torch.randint(0, 256, shape, generator=gen).float()
    q[torch.rand(shape, generator=gen) < 0.7] = 255
    x = q * 0.02  # min-max ranges: [0, 255·0.02] with 256 levels, scale 0.02, zero point 0
    _calibrate_acts(layer, x)
    return layer, _int_twin(layer, meta), x


def test_cpu_kernel_is_chosen_from_the_cpu_flags_and_can_be_forced(monkeypatch):
    isa = cpu_features()
    assert isa in ("amx", "avx512_vnni", "avx_vnni", "avx512", "avx2", "other")
    assert kernel_for(torch.device("cpu")) == ("onednn" if cpu_has_vnni() else "onednn-split")
    assert kernel_for(torch.device("cuda")) == "intmm"
    assert "onednn-split" in supported_kernels("cpu") and ("onednn" in supported_kernels("cpu")) == cpu_has_vnni()
    assert supported_kernels("cuda") == ["intmm"]
    for k in KERNELS[1:]:
        set_kernel(k)
        try:
            assert kernel_for(torch.device("cpu")) == k == kernel_for(torch.device("cuda"))
        finally:
            set_kernel("auto")
    with pytest.raises(PtqdError, match="unknown integer kernel"):
        set_kernel("avx9000")


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("kernel", supported_kernels("cpu"))
def test_every_supported_cpu_kernel_is_exact_at_the_saturation_limit(kind, kernel):
    """Each kernel variant this CPU supports, forced, reproduces the simulated layer on inputs that
    overflow int16 pair sums (W8A8), and on 4-bit weights (which no kernel needs to split); the
    VNNI one-pass kernel also runs 4-bit weights exactly on CPUs without VNNI."""
    g = torch.Generator().manual_seed(5)
    cases = [(8, kernel), (4, kernel)] + ([] if kernel == "onednn" else [(4, "onednn")])
    for wbits, k in cases:
        layer, il, x = _worst_case_layer(kind, wbits, g)
        ref = layer(x)
        set_kernel(k)
        try:
            out = il(x)
        finally:
            set_kernel("auto")
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), (wbits, k)


@pytest.mark.parametrize("geometry", [
    dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=1), dict(kernel_size=3, padding=2, dilation=2),
    dict(kernel_size=3, padding=1, groups=4), dict(kernel_size=(3, 1), padding=(1, 0)),
])
@pytest.mark.parametrize("pad_input", [True, False])
def test_zero_point_terms_at_the_borders(geometry, pad_input, monkeypatch):
    """The input zero point's contribution is folded into the bias and corrected at the borders (uint8
    input padded with the zero point, or patches on border rows/columns): every output position must
    match, whatever the stride, padding, dilation and grouping."""
    monkeypatch.setattr("ptqd.runtime.kernels.PAD_INPUT", pad_input)
    g = torch.Generator().manual_seed(2)
    fp = nn.Conv2d(16, 12, **geometry).requires_grad_(False)
    layer = _calibrated(fp, 8, True, 0, False)
    x = torch.randn(2, 16, 7, 10, generator=g) + 1.5  # mostly positive: a large input zero point offset
    _calibrate_acts(layer, x)
    il = _int_twin(layer, nn.Conv2d(16, 12, **geometry, device="meta"))
    assert int(il.act_quantizers[0].current_zero_point()) != 0
    ref, out = layer(x), il(x)
    off = (out - ref).abs() > 1e-5 * ref.abs().max()
    assert off.float().mean() < 0.02  # only outputs reading an input that sits on a rounding tie


def test_layer_switching_between_zero_and_nonzero_input_zero_points():
    """Mixed precision may give a layer's input a zero point of 0 at one bit-width and not at another
    (no zero-point terms at one, folded terms at the other): alternating steps must stay exact."""
    g = torch.Generator().manual_seed(4)
    for kind in ("conv", "linear"):
        if kind == "conv":
            fp, meta, x = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1, device="meta"), torch.rand(2, 8, 5, 5, generator=g)
        else:
            fp, meta, x = nn.Linear(8, 6), nn.Linear(8, 6, device="meta"), torch.rand(2, 3, 8, generator=g)
        layer = _calibrated(fp.requires_grad_(False), 8, False, 0, False)
        _calibrate_acts(layer, x - 0.2)
        layer.act_quantizers[0].zero_point[0] = 0.0  # A4 grid starts at 0, A8 does not
        il = _int_twin(layer, meta)
        for bits in (4, 8, 4, 8):
            for q in (layer.act_quantizers[0], il.act_quantizers[0]):
                q.set_bits(bits)
            ref = layer(x)
            assert (il(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_grouped_conv_with_offsets():
    g = torch.Generator().manual_seed(1)
    fp = nn.Conv2d(16, 8, 3, padding=1, groups=2).requires_grad_(False)
    with torch.no_grad():
        fp.weight[:, :, 0] += 0.4
    layer = _calibrated(fp, 8, False, 0, False)
    x = torch.randn(2, 16, 6, 6, generator=g)
    _calibrate_acts(layer, x)
    il = _int_twin(layer, nn.Conv2d(16, 8, 3, padding=1, groups=2, device="meta"))
    assert (il.wd_0 != 0).any()
    ref = layer(x)
    assert (il(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("bits,sym", [(8, False), (4, False), (8, True), (4, True)])
def test_fast_fake_quant_matches_the_act_quantizer(bits, sym):
    from ptqd.quant.quantizer import ActQuantizer
    from ptqd.runtime.attention import fused_fake_quant

    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 64, 33, generator=g) * 3 + 0.5
    aq = ActQuantizer([4, 8], QuantSpec(bits, sym))
    aq.observing = True
    aq(x[:, :32])  # a narrower range than x: the clamp at both ends matters
    aq.observing = False
    aq.calibrate_from_observed("minmax")
    aq.set_bits(bits)
    ref, out = aq(x), fused_fake_quant(aq, x.transpose(1, 2)).transpose(1, 2)
    step = float(aq.current_scale())
    # rounding x·(1/s) instead of x/s: a value within float rounding of a .5 tie may land one step away
    assert (out - ref).abs().max() <= step * 1.001
    assert (out != ref).float().mean() < 1e-3
    assert out.min() >= ref.min() and out.max() <= ref.max()


class _Attn:
    scale = 8 ** -0.5


@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("tile_bytes", [1 << 20, 3 * 40 * 24 * 4, 2 * 40 * 24 * 4, 7 * 24 * 4])  # whole batch, one element, two heads, seven rows
def test_tiled_attention_matches_the_simulated_attention(mask, tile_bytes, monkeypatch):
    from ptqd.quant.layers import AttentionQuantizers, QuantAttnProcessor
    from ptqd.runtime import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 3, 40, 8, generator=g), torch.randn(2, 3, 24, 8, generator=g), torch.randn(2, 3, 24, 8, generator=g)
    quant = AttentionQuantizers(QuantSpec(8, False), [4, 8], QuantSpec(8, False))
    for aq in quant.children():
        aq.observing = True
    QuantAttnProcessor().attend(_Attn, quant, q, k, v, None)
    for aq in quant.children():
        aq.observing = False
        aq.calibrate_from_observed("minmax")
    quant.softmax.zero_point[0] = 3  # a grid that does not start at 0 exercises the shift
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, 1, 24, generator=g) > 0.3
    elif mask == "float":
        m = torch.randn(2, 3, 40, 24, generator=g)
    monkeypatch.setattr(attention, "TILE_BYTES", tile_bytes)
    for bits in (8, 4):
        for aq in (quant.q, quant.k, quant.v):
            aq.set_bits(bits)
        ref = QuantAttnProcessor().attend(_Attn, quant, q, k, v, m)
        out = attention.FusedQuantAttnProcessor().attend(_Attn, quant, q, k, v, m)
        assert out.shape == ref.shape
        assert (out - ref).abs().max() < 1e-4 * ref.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_integer_layer_on_cuda_uses_int_mm(monkeypatch):
    from ptqd.runtime import kernel_for

    # the simulated reference must run in true fp32: with TF32 (cuDNN's default on Ampere/Hopper) its conv
    # is off by ~1e-3 relative, which is the reference's error, not the integer kernel's (seen on an H100)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)

    assert kernel_for(torch.device("cuda")) == "intmm"
    g = torch.Generator().manual_seed(0)
    fp = nn.Conv2d(64, 64, 3, padding=1).requires_grad_(False)
    layer = _calibrated(fp, 8, False, 0, True, gen=g)
    x = torch.randn(4, 64, 16, 16, generator=g)
    _calibrate_acts(layer, x)
    il = _int_twin(layer, nn.Conv2d(64, 64, 3, padding=1, device="meta"))
    layer.cuda()
    il.cuda()
    for aq in layer.weight_quantizers:
        aq.scale, aq.zero_point = aq.scale.cuda(), aq.zero_point.cuda()
    ref, out = layer(x.cuda()), il(x.cuda())
    assert out.is_cuda and (out - ref).abs().max() <= 1e-4 * ref.abs().max()


# ------------------------------------------------------------------------------------------
# checkpoints of a run of the bundled model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A W4A8 run of digits16-cond (naive calibration, activations at 4 and 8 bits, AdaRound-style
    rounding decisions on one layer) with PTQD statistics for SAMPLER."""
    out = tmp_path_factory.mktemp("run")
    config = QuantConfig(weight_bits=4, act_bits=8, extra_act_bits=[4])
    run = quantize(load("digits16-cond"), config, "naive", calib_samples=2, calib_steps=2, sampler=SAMPLER, out=out, progress=False)
    name, layer = next((n, m) for n, m in quant_layers(run.qnet) if m.weight_bits == 4)
    wq = layer.weight_quantizers[0]
    wq.round_up = torch.rand(layer.fp.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    run.config["correction"] = {"noise_samples": 2, "noise_seed": 2000, "mixed_precision": [4, 8]}
    save_run(run, out)
    collect_stats(run, StatsRequest(sampler=SAMPLER, num_samples=2, bits=[4, 8]), out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def checkpoint(run_dir, tmp_path_factory):
    return export_run(run_dir, tmp_path_factory.mktemp("ck") / "model.ptqd", progress=False)


def test_w4_checkpoint_is_small_and_self_describing(checkpoint):
    manifest = read_manifest(checkpoint)
    fp32 = (zoo_path("digits16-cond") / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    weights = manifest["files"][WEIGHTS]["bytes"]
    assert weights <= 0.16 * fp32
    total = sum(f.stat().st_size for f in checkpoint.iterdir())
    assert total <= 0.2 * fp32
    assert all(r["integer"] for r in manifest["layers"]) and any(p["packed"] for r in manifest["layers"] for p in r["parts"])
    stats = manifest["noise_stats"]
    assert stats and stats[0]["bits"] == [4, 8] and "A" in stats[0]["bit_schedule"]["text"]
    assert manifest["version"] == 2 and manifest["model"]["name"] == "digits16-cond"
    assert manifest["adapter"] == {"kind": "unet"} and manifest["decoder"] is None


def test_version_1_checkpoints_still_load(checkpoint, tmp_path):
    import shutil

    ck = tmp_path / "v1"
    shutil.copytree(checkpoint, ck)
    m = json.loads((ck / MANIFEST).read_text())
    m["version"] = 1
    del m["manifest_sha256"]  # version 1 manifests had no checksum of their own
    for key in ("adapter", "decoder"):
        del m[key]
    del m["model"]["prompts"]
    (ck / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(PtqdError, match="ptqd upgrade"):  # no checksum: refused until `ptqd upgrade` checked it
        load_checkpoint(ck, "fake")
    from ptqd.runtime.checkpoint import upgrade_checkpoint

    assert upgrade_checkpoint(ck)["upgraded"]
    x, y = torch.randn(2, 1, 16, 16), torch.arange(2)
    old, new = load_checkpoint(ck, "fake").model, load_checkpoint(checkpoint, "fake").model
    assert old.describe()["kind"] == "unet" and old.decoder is None
    assert torch.equal(old.denoise(x, torch.tensor(300), y, 3.0), new.denoise(x, torch.tensor(300), y, 3.0))


def test_loaded_checkpoint_reproduces_the_run(run_dir, checkpoint):
    from ptqd.runs import load_run

    run = load_run(run_dir)
    fake, integer = load_checkpoint(checkpoint, "fake"), load_checkpoint(checkpoint, "int")
    # the integer net's cheap dtype (no per-call module scan) is the float parts' dtype, same class otherwise
    assert integer.model.unet.dtype == torch.float32 and isinstance(integer.model.unet, type(fake.model.unet))
    assert type(integer.model.unet).__name__ == type(fake.model.unet).__name__
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 1, 16, 16, generator=g), torch.arange(4)
    for bits in (8, 4):
        for r in (run, fake, integer):
            r.set_act_bits(bits)
        fp = run.fp.denoise(x, torch.tensor(500), y, 3.0)
        sim = fake.model.denoise(x, torch.tensor(500), y, 3.0)
        out = integer.model.denoise(x, torch.tensor(500), y, 3.0)
        rel = lambda a, b: float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())  # noqa: E731
        # integer vs simulated: float summation order can flip an activation by one step at a rounding
        # boundary; that stays far below the quantization error itself
        assert rel(out, sim) < rel(sim, fp)
    # layer by layer (same inputs) the integer kernels agree with the simulated layers to float precision
    seen = {}
    def keep(name):
        def hook(module, args, out):
            seen.setdefault(name, (args[0], out))  # returns None: the output is not replaced

        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in quant_layers(fake.qnet)]
    fake.model.denoise(x, torch.tensor(500), y, 3.0)
    for h in hooks:
        h.remove()
    int_layers = dict(quant_layers(integer.qnet))
    assert set(seen) == set(int_layers) and all(isinstance(m, IntLayer) for m in int_layers.values())
    worst = max(float((int_layers[n](a) - o).abs().max() / o.abs().max().clamp(min=1e-6)) for n, (a, o) in seen.items())
    assert worst < 1e-2  # 1e-5 except where one activation sits on a rounding tie


def test_fake_backend_equals_the_simulated_network(checkpoint, run_dir):
    from ptqd.runs import load_run

    run, fake = load_run(run_dir), load_checkpoint(checkpoint, "fake")
    assert fake.model.fingerprint() == run.fp.fingerprint() == read_manifest(checkpoint)["model"]["fingerprint"]
    for m in dict(quant_layers(fake.qnet)).values():
        assert torch.equal(m.quantized_weight(), m.fp.weight)  # stored on the grid: quantizing again changes nothing
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    for bits in (8, 4):
        run.set_act_bits(bits)
        fake.set_act_bits(bits)
        a = run.model.denoise(x, torch.tensor(300), torch.tensor([1, 2]), 3.0)
        b = fake.model.denoise(x, torch.tensor(300), torch.tensor([1, 2]), 3.0)
        assert torch.equal(a, b)


def _damaged(checkpoint, tmp_path, name):
    import shutil

    dst = tmp_path / name
    shutil.copytree(checkpoint, dst)
    return dst


def test_damaged_checkpoints_are_refused(checkpoint, tmp_path):
    ck = _damaged(checkpoint, tmp_path, "truncated")
    data = (ck / WEIGHTS).read_bytes()
    (ck / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(PtqdError, match="truncated"):
        load_checkpoint(ck)

    ck = _damaged(checkpoint, tmp_path, "flipped")
    raw = bytearray((ck / WEIGHTS).read_bytes())
    raw[-10] ^= 0xFF
    (ck / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(PtqdError, match="checksum"):
        load_checkpoint(ck)

    ck = _damaged(checkpoint, tmp_path, "newer")
    m = json.loads((ck / MANIFEST).read_text())
    m["version"] = 99
    (ck / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(PtqdError, match="version 99.*upgrade"):
        load_checkpoint(ck)

    ck = _damaged(checkpoint, tmp_path, "garbled")
    (ck / MANIFEST).write_text((ck / MANIFEST).read_text()[:100])
    with pytest.raises(PtqdError, match="damaged"):
        load_checkpoint(ck)

    ck = _damaged(checkpoint, tmp_path, "stats_missing")
    next(ck.glob("noise_stats_*.safetensors")).unlink()
    with pytest.raises(PtqdError, match="missing"):
        load_checkpoint(ck)

    with pytest.raises(PtqdError, match="not a ptqd checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(PtqdError, match="backend"):
        load_checkpoint(checkpoint, backend="gpu")


def test_cli_export_and_sample(run_dir, checkpoint, tmp_path, capsys):
    ck = tmp_path / "cli.ptqd"
    assert main(["export", str(run_dir), "--out", str(ck)]) == 0
    assert "integer kernels" in capsys.readouterr().out
    args = ["--num", "3", "--steps", "4", "--no-progress"]
    # from the checkpoint alone: PTQD correction and the mixed bit schedule travel with it
    assert main(["sample", str(ck), "--correct", "all", "--act-bits", "mixed", *args, "--out", str(tmp_path / "int.npz")]) == 0
    rec = json.loads((tmp_path / "int.json").read_text())
    assert rec["checkpoint"]["backend"] == "int" and "bit_schedule" in rec and rec["correction"] == ["cnc", "bc", "vsc"]
    # the fake backend samples exactly what the run directory samples (same seeds)
    assert main(["sample", str(ck), "--backend", "fake", *args, "--out", str(tmp_path / "fake.npz")]) == 0
    assert main(["sample", str(run_dir), *args, "--out", str(tmp_path / "run.npz")]) == 0
    fake, run = np.load(tmp_path / "fake.npz")["images"], np.load(tmp_path / "run.npz")["images"]
    integer = np.load(tmp_path / "int.npz")["images"]
    assert fake.shape == run.shape == integer.shape and (fake == run).all()
    capsys.readouterr()
    assert main(["sample", str(run_dir), "--backend", "int", *args, "--out", str(tmp_path / "x.npz")]) == 2
    assert "--backend needs an exported checkpoint" in capsys.readouterr().err
    assert main(["export", str(ck), "--out", str(tmp_path / "again")]) == 2
    assert "already an exported checkpoint" in capsys.readouterr().err
    # what needs the FP model says so, and does not suggest running it on the checkpoint
    assert main(["stats", str(ck), "--no-progress"]) == 2
    assert "exported checkpoint, not a quantization run" in capsys.readouterr().err
    assert main(["sample", str(ck), "--num", "3", "--steps", "7", "--no-progress", "--out", str(tmp_path / "y.npz")]) == 2
    err = capsys.readouterr().err
    assert "no noise statistics" in err and "export again" in err and f"ptqd stats {ck}" not in err


def test_measure_speed(checkpoint):
    res = measure_speed("digits16-cond", checkpoint, batch=2, steps=1, repeats=2)
    assert set(res["rows"]) == {"fp32", "bf16", "int"} and res["rows"]["int"]["images_per_second"] > 0
    assert res["speedup"]["fp32"] == 1.0 and res["speedup"]["int"] > 0 and res["speedup_vs_bf16"]["bf16"] == 1.0
    assert all(len(r["seconds"]) == 2 for r in res["rows"].values()) and res["settings"]["interleaved"]
    with pytest.raises(PtqdError, match="unknown backends"):
        measure_speed("digits16-cond", checkpoint, backends=("fp64",))


def test_cpu_description_names_the_kernel_isa():
    from ptqd.runtime.kernels import cpu_features
    from ptqd.runtime.speed import cpu_description

    d = cpu_description()
    assert d["isa"] == cpu_features() and d["model"] and d["threads"] == torch.get_num_threads()
    assert all(f.startswith(("avx", "amx", "fma", "f16c", "sse4", "ssse3")) for f in d["simd_flags"])
