"""PTQD as a diffusers scheduler: a wrapper whose ``step`` corrects the quantized noise prediction.

``PTQDScheduler(base, corrector, sampler)`` behaves like ``base`` (a diffusers DDIM or DDPM scheduler:
``config``, ``timesteps``, ``set_timesteps``, ``init_noise_sigma`` … are the base's) except that
``step`` applies CNC/BC to the model output and, with VSC, shrinks the sampler's own noise
(:class:`ptqd.correction.Corrector`, the same code ``ptqd sample`` runs). Put it in any diffusers
pipeline as ``pipe.scheduler`` next to a quantized denoiser and the pipeline's own ``__call__``
samples corrected.

Statistics are made for one sampler setting (scheduler, steps, eta, guidance): the wrapper refuses a
call with other steps or eta before the first step, naming what it was made for.
"""

from __future__ import annotations

from typing import Any

from ptqd.correction.corrector import Corrector
from ptqd.errors import PtqdError
from ptqd.sampling import SamplerConfig


class PTQDScheduler:
    """A diffusers scheduler with PTQD's correction in ``step``."""

    def __init__(self, base, corrector: Corrector, sampler: SamplerConfig):
        kind = type(base).__name__
        if not kind.startswith(("DDIM", "DDPM")):
            raise PtqdError(f"PTQD correction supports DDIM and DDPM schedulers, not {kind}")
        if not kind.lower().startswith(sampler.scheduler):
            raise PtqdError(f"the statistics are for a {sampler.scheduler.upper()} sampler, but the pipeline's scheduler is {kind}")
        self.__dict__.update(base=base, corrector=corrector, sampler=sampler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("base", "corrector", "sampler"):
            self.__dict__[name] = value
        else:
            setattr(self.base, name, value)

    def __repr__(self) -> str:
        s = self.sampler
        eta = f", eta {s.eta:g}" if s.scheduler == "ddim" else ""
        return f"PTQDScheduler({type(self.base).__name__}, {s.steps} steps{eta}, parts {', '.join(self.corrector.parts) or 'none'})"

    @property
    def config(self):
        return self.base.config

    def set_timesteps(self, num_inference_steps: int, *args, **kwargs):
        if int(num_inference_steps) != self.sampler.steps:
            raise PtqdError(
                f"this PTQD-corrected scheduler holds noise statistics for {self.sampler.steps} steps, not "
                f"{num_inference_steps}: call the pipeline with num_inference_steps={self.sampler.steps}, or plan it for "
                f"{num_inference_steps} steps with ptqd.plan(pipe, steps={num_inference_steps}) (collects the statistics)"
            )
        return self.base.set_timesteps(num_inference_steps, *args, **kwargs)

    def step(self, model_output, timestep, sample, eta: float | None = None, generator=None, return_dict: bool = True, **kwargs):
        from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

        if self.sampler.scheduler == "ddim":
            eta = 0.0 if eta is None else float(eta)
            if abs(eta - self.sampler.eta) > 1e-9:
                raise PtqdError(
                    f"this PTQD-corrected scheduler holds noise statistics for DDIM eta {self.sampler.eta:g}, but the pipeline "
                    f"steps with eta {eta:g}: call it with eta={self.sampler.eta:g}, or plan it for eta {eta:g} with ptqd.plan"
                )
        else:
            eta = 0.0
        x = self.corrector.step(self.base, model_output, timestep, sample, generator, eta=eta)
        if not return_dict:
            return (x,)
        return DDIMSchedulerOutput(prev_sample=x, pred_original_sample=None)

    def save_pretrained(self, *args, **kwargs):
        raise PtqdError("a PTQD-corrected scheduler is saved with ptqd.save(pipe, DIR) (it writes the statistics too), not save_pretrained")
