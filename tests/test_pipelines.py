"""Bring your own diffusers model: tiny random-weight pipelines of every supported kind, saved with
save_pretrained, then quantize → noise statistics → corrected sampling through the CLI."""

import json

import numpy as np
import pytest
import torch

from ptqd.cli import main
from ptqd.correction import load_stats
from ptqd.errors import PtqdError
from ptqd.models import load
from ptqd.runs import load_run
from ptqd.runtime import load_checkpoint, read_manifest
from ptqd.quant.wrap import find_unsupported, quant_layers

STEPS = 3
PROMPTS = ["a red square", "a blue circle", "a green cat"]

# ------------------------------------------------------------------------------------------
# tiny pipelines built from configs


def _scheduler(kind="ddpm", **kw):
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[kind]
    return cls(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, **kw)


def _unet(channels=3, size=8, **kw):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, **kw,
    )


def _vq():
    from diffusers import VQModel

    return VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=3, num_vq_embeddings=16, norm_num_groups=4, sample_size=16, vq_embed_dim=3,
    )


def _kl(latent_channels=4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=16,
    )


def build(kind: str, path):
    """Save a tiny pipeline of ``kind`` to ``path``; returns the path."""
    from diffusers import DDIMPipeline, DDPMPipeline, LDMPipeline

    torch.manual_seed(0)
    if kind == "ddpm":
        pipe = DDPMPipeline(unet=_unet(), scheduler=_scheduler("ddpm"))
    elif kind == "ddim":
        pipe = DDIMPipeline(unet=_unet(channels=1), scheduler=_scheduler("ddim"))
    elif kind == "ldm-vq":
        pipe = LDMPipeline(vqvae=_vq(), unet=_unet(channels=3), scheduler=_scheduler("ddim"))
    elif kind == "ldm-kl-cond":  # class-conditional latent model: UNet2DModel with class embeddings + KL autoencoder
        pipe = LDMPipeline(vqvae=_kl(), unet=_unet(channels=4, num_class_embeds=5), scheduler=_scheduler("ddim"))
    elif kind == "dit":
        pipe = _dit()
    elif kind == "sd":
        pipe = _sd(path)
    else:
        raise KeyError(kind)
    pipe.save_pretrained(str(path))
    return path


def _dit():
    from diffusers import DiTPipeline, DiTTransformer2DModel

    net = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=4,
    )
    return DiTPipeline(transformer=net, vae=_kl(), scheduler=_scheduler("ddim"))


def tiny_clip():
    """A CLIP tokenizer over a character vocabulary and a 1-layer text encoder (nothing downloaded)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = [("r", "e"), ("re", "d</w>")]
    vocab["re"] = len(vocab)
    vocab["red</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=12)
    enc = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    return tok, enc


def _sd(path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )
    tok, enc = tiny_clip()
    return StableDiffusionPipeline(
        vae=_kl(), text_encoder=enc, tokenizer=tok, unet=unet, scheduler=_scheduler("ddim", steps_offset=1, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (thread start-up dominates; the CI box is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return lambda kind: build(kind, root / kind) if not (root / kind / "model_index.json").is_file() else root / kind


# ------------------------------------------------------------------------------------------
# end to end: quantize → statistics → corrected sampling


def _quantize(model_dir, run, *extra, guidance=None):
    args = [
        "quantize", "--model", str(model_dir), "--weight-bits", "4", "--method", "ptqd",
        "--calib-samples", "2", "--calib-steps", "2", "--recon-samples", "8", "--weight-iters", "2", "--act-iters", "1",
        "--recon-batch", "4", "--steps", str(STEPS), "--noise-samples", "3", "--out", str(run), "--no-progress", *extra,
    ]
    if guidance is not None:
        args += ["--guidance", str(guidance)]
    return main(args)


def _end_to_end(model_dir, tmp_path, capsys, *extra, sample_extra=(), guidance=None, vq_snaps=False):
    run = tmp_path / "run"
    assert _quantize(model_dir, run, *extra, guidance=guidance) == 0, capsys.readouterr().err
    stats = list(run.glob("noise_stats_*.safetensors"))
    assert len(stats) == 1
    npz = tmp_path / "s.npz"
    rc = main(["sample", str(run), "--num", "3", "--steps", str(STEPS), "--out", str(npz), "--no-progress", "--no-guard", *sample_extra])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads(npz.with_suffix(".json").read_text())
    assert rec["correction"] == ["cnc", "bc", "vsc"]
    plain = tmp_path / "plain.npz"
    rc = main(["sample", str(run), "--num", "3", "--steps", str(STEPS), "--correct", "none", "--out", str(plain), "--no-progress", *sample_extra])
    assert rc == 0, capsys.readouterr().err
    images = np.load(npz)["images"]
    assert images.dtype == np.uint8 and len(images) == 3
    if vq_snaps:  # a VQ decoder snaps latents to its codebook and may hide small corrections: compare latents
        assert not torch.equal(*_final_latents(run, guidance)), "the correction changed nothing"
    else:
        assert not (images == np.load(plain)["images"]).all(), "the correction changed nothing"
    return run, images, json.loads((run / "config.json").read_text())


def _checkpoint_round_trip(run, tmp_path, capsys, sample_extra=()):
    """Export ``run``; the checkpoint alone (no FP model) reproduces the run's samples (``s.npz``) with
    the fake backend, bit for bit, and runs them on integer kernels."""
    ck = tmp_path / "model.ptqd"
    assert main(["export", str(run), "--out", str(ck)]) == 0, capsys.readouterr().err
    ref = np.load(tmp_path / "s.npz")["images"]
    out = {}
    for backend in ("fake", "int"):
        npz = tmp_path / f"ck_{backend}.npz"
        rc = main(["sample", str(ck), "--backend", backend, "--num", "3", "--steps", str(STEPS), "--out", str(npz), "--no-progress", *sample_extra])
        assert rc == 0, capsys.readouterr().err
        out[backend] = np.load(npz)["images"]
    assert np.array_equal(out["fake"], ref)
    assert out["int"].shape == ref.shape
    assert np.abs(out["int"].astype(float) - ref).mean() < 8  # rounding-boundary flips only (of 255)
    return ck


def _final_latents(run_dir, guidance):
    """Final sampler outputs (before the decoder) with all corrections and with none."""
    from ptqd.correction import plan_sampling
    from ptqd.sampling import SamplerConfig, sample

    run = load_run(run_dir)
    cfg = SamplerConfig("ddim", STEPS, 1.0, guidance or 1.0, 0, 8)
    outs = []
    for correct in ("all", "none"):
        plan = plan_sampling(run, cfg, correct, guard=False)
        got = []
        plan.model.decoder = lambda x: got.append(x.clone()) or x
        sample(plan.model, 3, cfg, denoise=plan.denoise, corrector=plan.corrector, progress=False)
        outs.append(got[0])
    return outs


def test_ddpm_pixel_pipeline_end_to_end(pipes, tmp_path, capsys):
    model_dir = pipes("ddpm")
    m = load(model_dir)
    assert m.describe() == {"denoiser": "UNet2DModel", "kind": "unet"} and not m.conditional and not m.latent
    run, images, cfg = _end_to_end(model_dir, tmp_path, capsys, "--scheduler", "ddpm", sample_extra=("--scheduler", "ddpm"))
    assert images.shape == (3, 8, 8, 3)
    assert cfg["model"] == str(model_dir) and cfg["model_kind"]["kind"] == "unet"
    # first and last layers stay at 8 bit, the rest at 4
    layers = json.loads((run / "summary.json").read_text())["layers"]
    assert layers[0]["name"] == "conv_in" and layers[-1]["name"] == "conv_out"
    assert layers[0]["w_bits"] == 8 and layers[-1]["w_bits"] == 8 and layers[1]["w_bits"] == 4


def test_ddim_pipeline_end_to_end_mixed_precision(pipes, tmp_path, capsys):
    model_dir = pipes("ddim")
    run, images, cfg = _end_to_end(model_dir, tmp_path, capsys, "--mixed-precision", "4,8")
    assert images.shape == (3, 8, 8, 1) and cfg["correction"]["mixed_precision"] == [4, 8]
    rec = json.loads((tmp_path / "s.json").read_text())
    assert "A" in rec["bit_schedule"] and rec["sampling_bops"] > 0


def test_ddim_pipeline_fp_sample_and_evaluate_shape_error(pipes, tmp_path, capsys):
    model_dir = pipes("ddim")
    npz = tmp_path / "fp.npz"
    assert main(["sample", "--model", str(model_dir), "--num", "2", "--steps", "2", "--out", str(npz), "--no-progress"]) == 0
    assert np.load(npz)["images"].shape == (2, 8, 8, 1)
    capsys.readouterr()
    assert main(["evaluate", str(npz)]) == 2
    err = capsys.readouterr().err
    assert "16x16" in err and "(2, 8, 8, 1)" in err and "Inception" in err and "Traceback" not in err


def test_ldm_vq_pipeline_end_to_end(pipes, tmp_path, capsys):
    model_dir = pipes("ldm-vq")
    m = load(model_dir)
    assert m.latent and m.decoder.describe()["decoder"] == "VQModel" and (m.channels, m.image_size) == (3, 8)
    run, images, cfg = _end_to_end(model_dir, tmp_path, capsys)
    assert images.shape == (3, 16, 16, 3)  # decoded by the FP VQ decoder from 8x8 latents
    # only the denoiser is quantized: the decoder is not in the quantized network
    from safetensors.torch import load_file

    calib = load_file(str(run / "calibration.safetensors"))
    assert calib["x"].shape[1:] == (3, 8, 8)  # calibration works in latent space


def test_class_conditional_latent_kl_end_to_end(pipes, tmp_path, capsys):
    model_dir = pipes("ldm-kl-cond")
    m = load(model_dir)
    assert m.conditional and m.num_classes == 4 and m.null_class == 4 and m.decoder.describe()["decoder"] == "AutoencoderKL"
    run, images, cfg = _end_to_end(model_dir, tmp_path, capsys, guidance=2.0, sample_extra=("--labels", "1,3"))
    assert images.shape == (3, 16, 16, 3) and cfg["calibration"]["guidance"] == 2.0
    assert list(np.load(tmp_path / "s.npz")["labels"]) == [1, 3, 1]
    assert (run / "noise_stats_ddim3_eta1_g2.safetensors").is_file()
    ck = _checkpoint_round_trip(run, tmp_path, capsys, sample_extra=("--labels", "1,3"))
    assert read_manifest(ck)["decoder"]["class_name"] == "AutoencoderKL" and (ck / "decoder.safetensors").is_file()


def test_dit_pipeline_end_to_end_sees_only_eps(pipes, tmp_path, capsys):
    model_dir = pipes("dit")
    m = load(model_dir)
    assert m.describe()["kind"] == "dit" and m.describe()["learned_sigma"] and (m.num_classes, m.null_class) == (4, 4)
    x = torch.randn(2, 4, 8, 8)
    eps = m.denoise(x, torch.tensor(500), torch.tensor([0, 1]), 1.0)
    full = m.unet(x, timestep=torch.tensor([500, 500]), class_labels=torch.tensor([0, 1])).sample
    assert full.shape[1] == 8 and eps.shape == x.shape
    torch.testing.assert_close(eps, full[:, :4])
    # the quant engine covers the transformer: patch embedding first, final projection last, attention quantized
    assert find_unsupported(m.unet)[0] == []
    run, images, cfg = _end_to_end(model_dir, tmp_path, capsys, guidance=3.0)
    layers = json.loads((run / "summary.json").read_text())["layers"]
    assert layers[0]["name"] == "pos_embed.proj" and layers[-1]["name"] == "proj_out_2" and layers[-1]["w_bits"] == 8
    bops = json.loads((run / "summary.json").read_text())["bops_by_layer"]
    assert any(o["kind"] == "qk" for o in bops)
    stats = load_stats(next(run.glob("noise_stats_*.safetensors")))
    assert stats.meta["channels"] == 4 and stats.mu.shape[-1] == 4  # statistics of the noise half only
    ck = _checkpoint_round_trip(run, tmp_path, capsys)
    assert read_manifest(ck)["adapter"] == {"kind": "dit", "eps_channels": 4, "learned_sigma": True}


def test_stable_diffusion_pipeline_end_to_end_with_prompts(pipes, tmp_path, capsys):
    model_dir = pipes("sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration prompts\n" + "\n".join(PROMPTS) + "\n\n")
    with pytest.raises(PtqdError, match="--prompts FILE"):
        load(model_dir)
    m = load(model_dir, prompts=PROMPTS)
    assert m.describe()["kind"] == "cross-attention" and (m.num_classes, m.null_class) == (3, 3)
    ctx = m.adapter.context
    assert ctx.shape == (4, 12, 16)  # three prompts + the empty prompt, CLIP max length 12, width 16
    assert not torch.allclose(ctx[0], ctx[1]) and not torch.allclose(ctx[0], ctx[3])
    assert find_unsupported(m.unet)[0] == []
    run, images, cfg = _end_to_end(model_dir, tmp_path, capsys, "--prompts", str(prompts), guidance=4.0)
    assert images.shape == (3, 16, 16, 3) and cfg["prompts"] == PROMPTS
    rec = json.loads((tmp_path / "s.json").read_text())
    assert rec["prompts"] == PROMPTS and list(np.load(tmp_path / "s.npz")["labels"]) == [0, 1, 2]
    # cross-attention layers are quantized (to_k/to_v read the text context)
    names = [n for n, _ in quant_layers(load_run(run).qnet)]
    assert any(n.endswith("attn2.to_k") for n in names)
    layers = json.loads((run / "summary.json").read_text())["layers"]
    assert (layers[0]["name"], layers[-1]["name"]) == ("conv_in", "conv_out") and layers[-1]["w_bits"] == 8
    # a checkpoint carries the prompt embeddings (no text encoder): same samples, other prompts refused
    ck = _checkpoint_round_trip(run, tmp_path, capsys)
    assert read_manifest(ck)["model"]["prompts"] == PROMPTS
    with pytest.raises(PtqdError, match="exported prompts"):
        load_checkpoint(ck).base.with_prompts(["a yellow dog"])
    # sampling with other prompts reuses the run (prompt ids index the new file)
    other = tmp_path / "other.txt"
    other.write_text("a yellow dog\n")
    npz = tmp_path / "o.npz"
    assert main(["sample", str(run), "--prompts", str(other), "--num", "2", "--steps", str(STEPS), "--out", str(npz), "--no-progress"]) == 0
    assert json.loads(npz.with_suffix(".json").read_text())["prompts"] == ["a yellow dog"]
    # a run refuses to be redone with other calibration prompts
    capsys.readouterr()
    assert _quantize(model_dir, tmp_path / "run", "--prompts", str(other), guidance=4.0) == 2
    assert "prompts" in capsys.readouterr().err


def test_hub_repo_id_resolves_from_local_cache_only(pipes, tmp_path, capsys, monkeypatch):
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hub"
    commit = "0" * 40
    repo = cache / "models--someone--tiny-ddpm"
    shutil.copytree(pipes("ddpm"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    m = load("someone/tiny-ddpm", cache_dir=cache)
    assert m.name == "someone/tiny-ddpm" and m.fingerprint() == load(pipes("ddpm")).fingerprint()
    with pytest.raises(PtqdError, match="never downloads"):
        load("someone/not-cached", cache_dir=cache)
    with pytest.raises(PtqdError, match="unknown model 'nothing-here'"):
        load("nothing-here")
    # the CLI takes the repo id from the default hub cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    npz = tmp_path / "hub.npz"
    assert main(["sample", "--model", "someone/tiny-ddpm", "--num", "1", "--steps", "2", "--out", str(npz), "--no-progress"]) == 0
    assert json.loads(npz.with_suffix(".json").read_text())["model"] == "someone/tiny-ddpm"


def test_unsupported_denoiser_and_missing_conditioning_are_clear_errors(tmp_path):
    from diffusers import UNet2DConditionModel

    d = build("ddim", tmp_path / "m")
    idx = json.loads((d / "model_index.json").read_text())
    idx["unet"] = ["diffusers", "UNet3DConditionModel"]
    (d / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(PtqdError, match="UNet3DConditionModel is not supported"):
        load(d)
    # a cross-attention UNet with neither text encoder nor context table
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    ).save_pretrained(str(d / "unet"))
    idx["unet"] = ["diffusers", "UNet2DConditionModel"]
    (d / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(PtqdError, match="ptqd_context.safetensors"):
        load(d)
    with pytest.raises(PtqdError, match="no text encoder"):
        load(pipes_dir := build("ddim", tmp_path / "pixel"), prompts=["x"])
    assert pipes_dir.is_dir()


# ------------------------------------------------------------------------------------------
# CompVis LDM checkpoint conversion, on a synthetic state dict with the original key layout

COMPVIS_CONFIG = {
    "model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 8, "channels": 3,
            "cond_stage_key": "class_label", "conditioning_key": "crossattn",
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
                "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32, "attention_resolutions": [2],
                "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 1, "use_spatial_transformer": True,
                "transformer_depth": 1, "context_dim": 16,
            }},
            "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
                "embed_dim": 3, "n_embed": 16,
                "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
                             "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
            }},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                  "params": {"n_classes": 5, "embed_dim": 16, "key": "class_label"}},
        },
    }
}


def compvis_state_dict(seed=0):
    """The key layout and shapes of CompVis' openaimodel UNet, taming VQ autoencoder and ClassEmbedder
    for COMPVIS_CONFIG, written out by hand from the original architecture."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def p(name, *shape):
        sd[name] = torch.randn(*shape, generator=g) * 0.05

    def norm(name, c):
        p(f"{name}.weight", c)
        p(f"{name}.bias", c)

    def conv(name, o, i, k=3):
        p(f"{name}.weight", o, i, k, k)
        p(f"{name}.bias", o)

    def lin(name, o, i, bias=True):
        p(f"{name}.weight", o, i)
        if bias:
            p(f"{name}.bias", o)

    u = "model.diffusion_model."

    def resblock(name, i, o, temb=128):
        norm(f"{name}.in_layers.0", i)
        conv(f"{name}.in_layers.2", o, i)
        lin(f"{name}.emb_layers.1", o, temb)
        norm(f"{name}.out_layers.0", o)
        conv(f"{name}.out_layers.3", o, o)
        if i != o:
            conv(f"{name}.skip_connection", o, i, 1)

    def spatial(name, c, ctx=16):
        norm(f"{name}.norm", c)
        conv(f"{name}.proj_in", c, c, 1)
        b = f"{name}.transformer_blocks.0"
        for a, kv in (("attn1", c), ("attn2", ctx)):
            lin(f"{b}.{a}.to_q", c, c, bias=False)
            lin(f"{b}.{a}.to_k", c, kv, bias=False)
            lin(f"{b}.{a}.to_v", c, kv, bias=False)
            lin(f"{b}.{a}.to_out.0", c, c)
        lin(f"{b}.ff.net.0.proj", c * 8, c)  # GEGLU: 2 × 4c
        lin(f"{b}.ff.net.2", c, c * 4)
        for n in ("norm1", "norm2", "norm3"):
            norm(f"{b}.{n}", c)
        conv(f"{name}.proj_out", c, c, 1)

    lin(u + "time_embed.0", 128, 32)
    lin(u + "time_embed.2", 128, 128)
    conv(u + "input_blocks.0.0", 32, 3)
    resblock(u + "input_blocks.1.0", 32, 32)
    conv(u + "input_blocks.2.0.op", 32, 32)
    resblock(u + "input_blocks.3.0", 32, 64)
    spatial(u + "input_blocks.3.1", 64)
    resblock(u + "middle_block.0", 64, 64)
    spatial(u + "middle_block.1", 64)
    resblock(u + "middle_block.2", 64, 64)
    resblock(u + "output_blocks.0.0", 128, 64)
    spatial(u + "output_blocks.0.1", 64)
    resblock(u + "output_blocks.1.0", 96, 64)
    spatial(u + "output_blocks.1.1", 64)
    conv(u + "output_blocks.1.2.conv", 64, 64)
    resblock(u + "output_blocks.2.0", 96, 32)
    resblock(u + "output_blocks.3.0", 64, 32)
    norm(u + "out.0", 32)
    conv(u + "out.2", 3, 32)

    f = "first_stage_model."

    def vblock(name, i, o):
        norm(f"{name}.norm1", i)
        conv(f"{name}.conv1", o, i)
        norm(f"{name}.norm2", o)
        conv(f"{name}.conv2", o, o)
        if i != o:
            conv(f"{name}.nin_shortcut", o, i, 1)

    def vmid(name, c):
        vblock(f"{name}.block_1", c, c)
        norm(f"{name}.attn_1.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{n}", c, c, 1)
        vblock(f"{name}.block_2", c, c)

    conv(f + "encoder.conv_in", 32, 3)
    vblock(f + "encoder.down.0.block.0", 32, 32)
    conv(f + "encoder.down.0.downsample.conv", 32, 32)
    vblock(f + "encoder.down.1.block.0", 32, 64)
    vmid(f + "encoder.mid", 64)
    norm(f + "encoder.norm_out", 64)
    conv(f + "encoder.conv_out", 3, 64)
    conv(f + "quant_conv", 3, 3, 1)
    p(f + "quantize.embedding.weight", 16, 3)
    conv(f + "post_quant_conv", 3, 3, 1)
    conv(f + "decoder.conv_in", 64, 3)
    vmid(f + "decoder.mid", 64)
    vblock(f + "decoder.up.1.block.0", 64, 64)
    vblock(f + "decoder.up.1.block.1", 64, 64)
    conv(f + "decoder.up.1.upsample.conv", 64, 64)
    vblock(f + "decoder.up.0.block.0", 64, 32)
    vblock(f + "decoder.up.0.block.1", 32, 32)
    norm(f + "decoder.norm_out", 32)
    conv(f + "decoder.conv_out", 3, 32)
    p("cond_stage_model.embedding.weight", 5, 16)
    return sd


def test_compvis_ldm_checkpoint_converts_and_runs_end_to_end(tmp_path, capsys):
    import yaml

    sd = compvis_state_dict()
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 1}, ckpt)
    cfg = tmp_path / "cin-tiny.yaml"
    cfg.write_text(yaml.safe_dump(COMPVIS_CONFIG))
    out = tmp_path / "converted"
    (tmp_path / "converted.partial").mkdir()  # a user's directory beside --out: left alone
    (tmp_path / "converted.partial" / "keep.txt").write_text("mine")
    assert main(["convert-ldm", str(ckpt), "--config", str(cfg), "--out", str(out)]) == 0, capsys.readouterr().err
    assert (tmp_path / "converted.partial" / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".converted")]  # no temporary directory left
    m = load(out)
    assert m.describe()["kind"] == "cross-attention" and m.describe()["decoder"] == "VQModel"
    assert (m.num_classes, m.null_class) == (4, 4) and m.latent and m.decoder.scaling_factor == 1.0
    u = m.unet.state_dict()
    # tensors land where the original architecture had them
    u0 = "model.diffusion_model."
    torch.testing.assert_close(u["conv_in.weight"], sd[u0 + "input_blocks.0.0.weight"])
    torch.testing.assert_close(u["conv_out.weight"], sd[u0 + "out.2.weight"])
    torch.testing.assert_close(u["time_embedding.linear_2.weight"], sd[u0 + "time_embed.2.weight"])
    torch.testing.assert_close(
        u["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"],
        sd[u0 + "input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"],
    )
    torch.testing.assert_close(u["up_blocks.0.upsamplers.0.conv.weight"], sd[u0 + "output_blocks.1.2.conv.weight"])
    torch.testing.assert_close(m.adapter.context[:, 0], sd["cond_stage_model.embedding.weight"])
    v = m.decoder.vae.state_dict()
    torch.testing.assert_close(v["quantize.embedding.weight"], sd["first_stage_model.quantize.embedding.weight"])
    torch.testing.assert_close(v["decoder.conv_out.weight"], sd["first_stage_model.decoder.conv_out.weight"])
    # CompVis' sqrt-linear β schedule and DDIM timesteps (1, 1+c, ...)
    from ptqd.sampling import make_scheduler

    s = make_scheduler(m, "ddim", 20)
    betas = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(s.betas.double(), betas, rtol=1e-5, atol=1e-7)
    assert s.timesteps[-1] == 1 and s.timesteps[0] == 951
    # a checkpoint that does not fit its config is refused, not filled with random weights
    bad = dict(sd)
    del bad[u0 + "out.2.weight"]
    from ptqd.models.convert import convert_compvis_ldm

    with pytest.raises(PtqdError, match="1 missing"):
        convert_compvis_ldm(bad, COMPVIS_CONFIG, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    # and the converted model goes through quantize → statistics → corrected sampling
    _end_to_end(out, tmp_path, capsys, guidance=3.0, vq_snaps=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["ldm-kl-cond", "dit", "sd"])
def test_end_to_end_on_cuda(pipes, kind, tmp_path, capsys):
    model_dir = pipes(kind)
    extra = ("--device", "cuda")
    if kind == "sd":
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS))
        extra += ("--prompts", str(prompts))
    run, images, cfg = _end_to_end(model_dir, tmp_path, capsys, *extra, guidance=2.0, sample_extra=("--device", "cuda"))
    assert images.shape == (3, 16, 16, 3)
    # a run calibrated on the GPU loads and samples on the CPU with the same quantizer state
    cpu = tmp_path / "cpu.npz"
    assert main(["sample", str(run), "--num", "3", "--steps", str(STEPS), "--out", str(cpu), "--no-progress"]) == 0
    assert np.load(cpu)["images"].shape == images.shape
