"""The Python API: ptqd.quantize on diffusers pipelines and denoisers, PTQD inside the pipeline's own
__call__, save/load, plans for other samplers, and the README quickstart."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import ptqd
from ptqd.cli import main
from ptqd.correction.scheduler import PTQDScheduler
from ptqd.errors import PtqdError
from ptqd.models.pipeline import ClassConditionalPipeline, to_uint8_images
from ptqd.quant.denoiser import QuantizedDenoiser
from ptqd.sampling import SamplerConfig, load_samples, sample_generators

N, STEPS = 6, 10


def tiny_unet(classes: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=(classes + 1) if classes else None,
    )


def saved_pipeline(tmp_path: Path, conditional: bool):
    """A tiny FP pipeline built from configs, saved and loaded back as a user would have it."""
    from diffusers import DDIMPipeline, DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    cls = ClassConditionalPipeline if conditional else DDIMPipeline
    cls(unet=tiny_unet(3 if conditional else 0), scheduler=sched).save_pretrained(tmp_path / "fp")
    return cls.from_pretrained(tmp_path / "fp")


def call(pipe, conditional: bool, **kw):
    args = {"num_inference_steps": STEPS, "eta": 1.0, "generator": sample_generators(0, range(N)), "output_type": "np", **kw}
    if conditional:
        args.update(class_labels=[i % 3 for i in range(N)], guidance_scale=3.0)
    else:
        args.update(batch_size=N)
    return to_uint8_images(pipe(**args).images)


@pytest.fixture(scope="module", params=[False, True], ids=["ddim-pipeline", "class-conditional"])
def quantized(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    pipe = saved_pipeline(tmp, request.param)
    sampler = SamplerConfig("ddim", STEPS, 1.0, 3.0 if request.param else 1.0, batch_size=N)
    qpipe = ptqd.quantize(pipe, ptqd.W4A8, method="ptqd", preset="quick", sampler=sampler, out=tmp / "run", progress=False)
    return request.param, tmp, pipe, qpipe


def test_quantize_returns_the_same_pipeline_kind_quantized_and_corrected(quantized):
    conditional, _, pipe, qpipe = quantized
    assert type(qpipe) is type(pipe)
    assert isinstance(qpipe.unet, QuantizedDenoiser) and isinstance(qpipe.scheduler, PTQDScheduler)
    assert qpipe.scheduler.corrector.parts == ("cnc", "bc", "vsc")
    assert not isinstance(pipe.unet, QuantizedDenoiser)  # the FP pipeline is untouched
    fp_images, q_images = call(pipe, conditional), call(qpipe, conditional)
    assert fp_images.shape == q_images.shape == (N, 8, 8, 1)
    assert 0 < np.abs(fp_images.astype(int) - q_images.astype(int)).mean() < 60  # quantized: close to FP, not equal


def test_pipeline_call_equals_ptqd_sample_of_the_same_run(quantized, tmp_path):
    conditional, tmp, _, qpipe = quantized
    out = tmp_path / "s.npz"
    assert main(["sample", str(tmp / "run"), "--num", str(N), "--steps", str(STEPS), "--eta", "1", "--seed", "0",
                 "--batch-size", str(N), "--out", str(out), "--no-progress"]) == 0
    cli = load_samples(out).images
    mine = call(qpipe, conditional)
    diff = np.abs(cli.astype(int) - mine.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # same run, seeds and corrections: same images (float rounding)


def test_save_then_load_fake_is_bit_identical(quantized, tmp_path):
    conditional, _, _, qpipe = quantized
    path = ptqd.save(qpipe, tmp_path / "q.ptqd")
    back = ptqd.load(path, backend="fake")
    assert type(back) is type(qpipe) and isinstance(back.scheduler, PTQDScheduler)
    assert np.array_equal(call(back, conditional), call(qpipe, conditional))
    integer = ptqd.load(path, backend="int")
    assert np.abs(call(integer, conditional).astype(int) - call(qpipe, conditional).astype(int)).mean() < 8


def test_save_pretrained_refuses_and_names_ptqd_save(quantized, tmp_path):
    _, _, _, qpipe = quantized
    with pytest.raises(PtqdError, match="ptqd.save"):
        qpipe.unet.save_pretrained(tmp_path / "x")
    with pytest.raises(PtqdError, match="ptqd.save"):
        qpipe.save_pretrained(tmp_path / "y")


def test_other_sampler_refused_then_planned(quantized, tmp_path):
    conditional, _, _, qpipe = quantized
    with pytest.raises(PtqdError, match="num_inference_steps=10"):
        qpipe.scheduler.set_timesteps(5)
    with pytest.raises(PtqdError, match="eta=1"):
        qpipe.scheduler.step(torch.zeros(1, 1, 8, 8), qpipe.scheduler.timesteps[0], torch.zeros(1, 1, 8, 8), eta=0.0)
    five = ptqd.plan(qpipe, steps=5, progress=False)  # collects the statistics for 5 steps, then samples corrected
    assert five.scheduler.sampler.steps == 5 and type(five) is type(qpipe)
    images = call(five, conditional, num_inference_steps=5)
    assert images.shape == (N, 8, 8, 1)
    back = ptqd.load(ptqd.save(five, tmp_path / "five.ptqd"), backend="fake")  # the plan travels with the checkpoint
    assert back.scheduler.sampler.steps == 5
    assert np.array_equal(call(back, conditional, num_inference_steps=5), images)


def test_quantize_a_denoiser_with_a_forward_loop():
    from diffusers import DDPMScheduler

    unet = tiny_unet()
    calls = []

    def forward_loop(net):
        g = torch.Generator().manual_seed(0)
        for t in (900, 500, 100):
            calls.append(t)
            net(torch.randn(4, 1, 8, 8, generator=g), torch.tensor(t))

    qnet = ptqd.quantize(unet, ptqd.W8A8, method="qdiff", preset="quick", forward_loop=forward_loop,
                         scheduler=DDPMScheduler(), block_order="registration", progress=False)
    assert isinstance(qnet, QuantizedDenoiser) and calls == [900, 500, 100]
    x = torch.randn(2, 1, 8, 8)
    fp_out, q_out = unet(x, torch.tensor(500)).sample, qnet(x, torch.tensor(500)).sample
    assert fp_out.shape == q_out.shape and 0 < (fp_out - q_out).abs().mean() < 0.2 * fp_out.abs().mean()
    run = ptqd.api.run_of(qnet)
    assert run.config["calibration"]["forward_loop"] == "forward_loop"
    assert run.config["options"]["block_order"] == run.summary["block_order"] == "registration"


def test_bad_objects_are_refused():
    with pytest.raises(PtqdError, match="diffusers pipeline"):
        ptqd.quantize(42, ptqd.W8A8)
    with pytest.raises(PtqdError, match="unknown preset"):
        ptqd.quantize("digits16-cond", ptqd.W8A8, preset="fastest")


@pytest.mark.slow
def test_readme_python_quickstart_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"<!-- quickstart -->\s*```python\n(.*?)```", readme, re.S)
    assert block, "README has no quickstart block"
    code = block.group(1)
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 5
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README quickstart", "exec"), scope)
    assert isinstance(scope["qpipe"], ClassConditionalPipeline) and isinstance(scope["qpipe"].unet, QuantizedDenoiser)
    assert len(scope["images"]) == 3 and (tmp_path / "digits-w4a8.ptqd").is_dir()


def test_latent_zoo_model_quantizes_to_a_decoding_pipeline_that_saves_and_loads(tmp_path):
    """digits-ldm: ptqd.quantize gives a ClassConditionalPipeline whose FP vae decodes the quantized
    UNet's latents; ptqd.save / ptqd.load rebuild it with the same images."""
    sampler = SamplerConfig("ddim", 4, 1.0, 3.0, batch_size=4)
    qpipe = ptqd.quantize("digits-ldm", ptqd.W4A8, method="ptqd", preset="quick", sampler=sampler, out=tmp_path / "run", progress=False)
    assert isinstance(qpipe, ClassConditionalPipeline) and isinstance(qpipe.unet, QuantizedDenoiser)
    assert type(qpipe.vae).__name__ == "AutoencoderKL" and isinstance(qpipe.scheduler, PTQDScheduler)
    kw = dict(class_labels=[0, 1, 2, 3], guidance_scale=3.0, num_inference_steps=4, eta=1.0, output_type="np")
    images = to_uint8_images(qpipe(generator=sample_generators(0, range(4)), **kw).images)
    assert images.shape == (4, 16, 16, 1)
    back = ptqd.load(ptqd.save(qpipe, tmp_path / "ck"), backend="fake")
    assert type(back.vae).__name__ == "AutoencoderKL"
    assert np.array_equal(to_uint8_images(back(generator=sample_generators(0, range(4)), **kw).images), images)


def test_plan_with_a_correction_model_saves_and_loads(quantized, tmp_path):
    conditional, _, _, qpipe = quantized
    content = ptqd.plan(qpipe, correction_model="content", guard=False)  # the models as they are (the guard may switch one off)
    assert content.scheduler.corrector.parts == ("content", "vsc") and content.scheduler.corrector.model == "content"
    assert not np.array_equal(call(content, conditional), call(qpipe, conditional))
    debias = ptqd.plan(qpipe, correction_model="debias", correct="cnc,bc", guard=False)
    back = ptqd.load(ptqd.save(debias, tmp_path / "d.ptqd"), backend="fake")
    assert back.scheduler.corrector.parts == ("debias",)
    assert np.array_equal(call(back, conditional), call(debias, conditional))
    with pytest.raises(PtqdError, match="mixed precision needs a run calibrated for two or more"):
        ptqd.plan(qpipe, fidelity_budget=1.5)  # this run was calibrated for A8 only
