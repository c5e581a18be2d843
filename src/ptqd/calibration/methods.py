"""Calibration methods: set the quantizers of a wrapped network from calibration data.

``naive``: min-max weight ranges and min-max activation ranges over the calibration set.

``qdiff`` (Q-Diffusion / BRECQ): MSE-searched weight ranges; AdaRound weight rounding learned
block by block (BRECQ: residual blocks, attention blocks, up/down-samplers, the time embedding,
and lone layers) with activations in float, minimising the block's output error against the FP
network's; then MSE-searched activation ranges and learned activation step sizes (LSQ), block by
block again, for every calibrated activation bit-width.

Block inputs come from the network being quantized (earlier blocks already quantized), targets
from the FP network on the same calibration inputs. Blocks are visited in module registration
order (``block_order="registration"``, the default; in diffusers UNets: down blocks, up blocks, then
the mid block) or in the order one forward pass first calls them (``"forward"``, traced on the
model's example input, so each block is tuned against inputs from blocks already reconstructed; on
digits-ldm it measured no better).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ptqd import defaults
from ptqd.calibration.data import CalibrationSet
from ptqd.checks import check_finite, first_nonfinite
from ptqd.errors import PtqdError
from ptqd.models.loading import DiffusionModel, example_forward
from ptqd.quant.layers import QuantLayer
from ptqd.quant.quantizer import PASS_BITS, ActQuantizer, WeightQuantizer
from ptqd.quant.wrap import act_quantizers, set_act_bits, set_quant_state

METHODS = ("naive", "qdiff")
BLOCK_ORDERS = defaults.BLOCK_ORDERS
UNIT_TYPES = ("ResnetBlock2D", "BasicTransformerBlock", "Attention", "Downsample2D", "Upsample2D", "TimestepEmbedding")


@dataclass
class CalibrationOptions:
    """Knobs of the calibration methods. Defaults finish on the zoo model in a few minutes on 2 cores
    (the official code uses 20k weight and 5k activation iterations on GPUs)."""

    method: str = "qdiff"
    recon_samples: int = defaults.RECON_SAMPLES  # network inputs used for block reconstruction
    weight_iters: int = defaults.WEIGHT_ITERS
    act_iters: int = defaults.ACT_ITERS
    batch_size: int = defaults.RECON_BATCH
    weight_lr: float = 1e-2  # Adam on AdaRound's alpha
    act_lr: float = 1e-2  # Adam on step sizes, relative to each initial step size
    round_reg: float = 0.01  # AdaRound rounding regulariser weight
    warmup: float = 0.2  # fraction of weight iterations without the rounding regulariser
    forward_batch: int = 256
    seed: int = 0
    # order the blocks are reconstructed in: "forward" (the order one forward pass first calls them)
    # or "registration" (module registration order: in diffusers UNets down, up, then mid)
    block_order: str = defaults.BLOCK_ORDER

    def validate(self) -> None:
        if self.method not in METHODS:
            raise PtqdError(f"unknown calibration method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.block_order not in BLOCK_ORDERS:
            raise PtqdError(f"unknown block order {self.block_order!r}: use one of {', '.join(BLOCK_ORDERS)}")
        for name in ("recon_samples", "batch_size", "forward_batch"):
            if getattr(self, name) < 1:
                raise PtqdError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("weight_iters", "act_iters"):
            if getattr(self, name) < 0:
                raise PtqdError(f"{name} must be 0 or more, got {getattr(self, name)}")


# ----------------------------------------------------------------------------------------------
# running the network on calibration inputs


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@torch.no_grad()
def run_network(model: DiffusionModel, net: nn.Module, x, t, y, batch: int) -> None:
    for s in _batches(len(x), batch):
        model.denoise(x[s], t[s], y[s] if y is not None else None, 1.0, unet=net)


@torch.no_grad()
def observe_activations(model: DiffusionModel, net: nn.Module, inputs, batch: int, method: str | None = None) -> None:
    """Record every activation quantizer's input over the calibration inputs, then set its scales."""
    quantizers = [q for _, q in act_quantizers(net)]
    for q in quantizers:
        q.reset_observer()
        q.observing = True
    try:
        run_network(model, net, *inputs, batch=batch)
    finally:
        for q in quantizers:
            q.observing = False
    for name, q in act_quantizers(net):
        if q._lo is not None and not (bool(torch.isfinite(q._lo)) and bool(torch.isfinite(q._hi))):
            weight = first_nonfinite(net)
            raise PtqdError(
                f"calibration: the activation range of {name} is not finite ({float(q._lo)} .. {float(q._hi)})"
                + (f"; first non-finite weight: {weight}" if weight else "; every weight is finite, so the activations overflow")
            )
        try:
            q.calibrate_from_observed(method)
        except PtqdError as e:
            raise PtqdError(f"{name}: {e}") from None


def recon_units(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks reconstructed together (BRECQ granularity), in module registration order; lone layers
    are their own unit. :func:`ordered_units` puts them in the order the calibration visits them."""
    units: list[tuple[str, nn.Module]] = []

    def has_quant(m: nn.Module) -> bool:
        return isinstance(m, QuantLayer) or any(isinstance(c, QuantLayer) for c in m.modules())

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, QuantLayer) or (type(child).__name__ in UNIT_TYPES and has_quant(child)):
                units.append((full, child))
            elif not isinstance(child, (WeightQuantizer, ActQuantizer)):
                visit(full, child)

    visit("", net)
    return units


@torch.no_grad()
def forward_order(net: nn.Module, units: list[tuple[str, nn.Module]], run_once) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """``units`` in the order one forward pass (``run_once(net)``) first calls them; a unit called
    several times counts at its first call. Units the pass never calls follow, in the order given.
    The pass runs with every quantizer off (it needs no calibration; quantization does not change
    which blocks run) and leaves them as they were. Returns (ordered units, names of the units never called)."""
    first: dict[str, int] = {}
    handles = []
    quantizers = [m for m in net.modules() if isinstance(m, (WeightQuantizer, ActQuantizer))]
    enabled = [q.enabled for q in quantizers]

    def hook(name: str):
        def pre(m, args):
            first.setdefault(name, len(first))

        return pre

    try:
        for q in quantizers:
            q.enabled = False
        for name, unit in units:
            handles.append(unit.register_forward_pre_hook(hook(name)))
        run_once(net)
    finally:
        for h in handles:
            h.remove()
        for q, on in zip(quantizers, enabled):
            q.enabled = on
    called = sorted((u for u in units if u[0] in first), key=lambda u: first[u[0]])
    missing = [u for u in units if u[0] not in first]
    return called + missing, [name for name, _ in missing]


def ordered_units(model: DiffusionModel, net: nn.Module, order: str = defaults.BLOCK_ORDER) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The reconstruction units of ``net`` in ``order`` (see :data:`BLOCK_ORDERS`); ``forward`` traces one
    forward pass of ``model``'s example input (:func:`ptqd.models.loading.example_forward`) through ``net``.
    Returns (units, names of the units the trace never called: they come last, in registration order)."""
    if order not in BLOCK_ORDERS:
        raise PtqdError(f"unknown block order {order!r}: use one of {', '.join(BLOCK_ORDERS)}")
    units = recon_units(net)
    if order == "registration":
        return units, []
    return forward_order(net, units, example_forward(model))


class _Stop(Exception):
    pass


def _merge(items: list[Any], sizes: list[int]) -> Any:
    first = items[0]
    if isinstance(first, torch.Tensor):
        if first.ndim > 0 and all(it.shape[0] == s for it, s in zip(items, sizes)):
            return torch.cat(items)
        return first
    if isinstance(first, (tuple, list)):
        return type(first)(_merge([it[i] for it in items], sizes) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _merge([it[k] for it in items], sizes) for k in first}
    return first


def _take(obj: Any, idx: torch.Tensor, n: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[idx] if obj.ndim > 0 and obj.shape[0] == n else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_take(o, idx, n) for o in obj)
    if isinstance(obj, dict):
        return {k: _take(v, idx, n) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture(model: DiffusionModel, net: nn.Module, unit: str, inputs, batch: int, want: str) -> Any:
    """Run the calibration inputs through ``net`` up to ``unit``; return its (args, kwargs) or its output."""
    mod = net.get_submodule(unit)
    got: list[Any] = []

    def pre(m, args, kwargs):
        if want == "inputs":
            got.append((args, kwargs))
            raise _Stop

    def post(m, args, kwargs, out):
        got.append(out)
        raise _Stop

    h1 = mod.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = mod.register_forward_hook(post, with_kwargs=True)
    sizes = []
    try:
        x, t, y = inputs
        for s in _batches(len(x), batch):
            n_before = len(got)
            try:
                model.denoise(x[s], t[s], y[s] if y is not None else None, 1.0, unet=net)
            except _Stop:
                pass
            if len(got) == n_before:
                raise PtqdError(f"block {unit} was not called by the network's forward pass; cannot calibrate it")
            sizes.append(s.stop - s.start)
    finally:
        h1.remove()
        h2.remove()
    return _merge(got, sizes)


def _rec_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BRECQ's reconstruction loss: squared error summed over dim 1, averaged over the rest."""
    d = (out - target).pow(2)
    return d.sum(1).mean() if d.ndim > 1 else d.mean()


def _per_sample_err(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).reshape(len(out), -1).sum(1)


def _index_batches(n: int, size: int):
    return [torch.arange(i, min(n, i + size)) for i in range(0, n, size)]


def _unit_weight_quantizers(unit: nn.Module) -> list[tuple[WeightQuantizer, torch.Tensor]]:
    pairs = []
    layers = [unit] if isinstance(unit, QuantLayer) else [m for m in unit.modules() if isinstance(m, QuantLayer)]
    for layer in layers:
        for q, w in zip(layer.weight_quantizers, layer.weight_parts()):
            if q.enabled and q.bits < PASS_BITS:
                pairs.append((q, w.detach()))
    return pairs


def reconstruct_weights(unit: nn.Module, args, kwargs, target, opts: CalibrationOptions, gen: torch.Generator) -> float:
    """AdaRound the weights of ``unit`` (activations in float). Returns the final reconstruction loss."""
    pairs = _unit_weight_quantizers(unit)
    if not pairs or opts.weight_iters == 0:
        return float("nan")
    params = [q.init_adaround(w) for q, w in pairs]
    opt = torch.optim.Adam(params, lr=opts.weight_lr)
    n = target.shape[0]
    warm = int(opts.warmup * opts.weight_iters)
    rec = torch.tensor(float("nan"))
    with torch.enable_grad():
        for it in range(opts.weight_iters):
            idx = torch.randint(0, n, (min(opts.batch_size, n),), generator=gen)
            out = unit(*_take(args, idx, n), **_take(kwargs, idx, n))
            rec = _rec_loss(out, target[idx])
            loss = rec
            if it >= warm:
                rel = (it - warm) / max(1, opts.weight_iters - warm)
                beta = 2.0 + (20.0 - 2.0) * max(0.0, 1.0 - rel)
                reg = sum((1 - (2 * q.soft_bits() - 1).abs().pow(beta)).sum() for q, _ in pairs)
                loss = rec + opts.round_reg * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for q, _ in pairs:
        q.finish_adaround()
    loss = float(rec.detach())
    if not math.isfinite(loss):
        raise PtqdError(f"the weight reconstruction loss is not finite ({loss}) after {opts.weight_iters} iterations")
    return loss


def reconstruct_acts(unit: nn.Module, args, kwargs, target, opts: CalibrationOptions, gen: torch.Generator, learn_fixed: bool) -> float:
    """Learn the step sizes of the activation quantizers in ``unit`` at their current bit-widths.

    Returns the final relative loss (1.0 = as good as the initial step sizes)."""
    quantizers = [
        q for q in unit.modules() if isinstance(q, ActQuantizer) and q.enabled and q.bits < PASS_BITS and (learn_fixed or not q.fixed)
    ]
    if not quantizers or opts.act_iters == 0:
        return float("nan")
    params = [q.current_scale() for q in quantizers]
    groups = [{"params": [p], "lr": opts.act_lr * float(p.detach().abs().clamp(min=1e-8))} for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    n = target.shape[0]
    # Each input's error is measured relative to its error at the start. Without this the last
    # sampler steps (t near 0), where 8-bit input quantization is amplified enormously, dominate
    # the loss and the step sizes fit them at the expense of every other step.
    with torch.no_grad():
        base = torch.cat([_per_sample_err(unit(*_take(args, i, n), **_take(kwargs, i, n)), target[i]) for i in _index_batches(n, 256)])
        base = base.clamp(min=base.mean() * 1e-3 + 1e-12)
    rec = torch.tensor(float("nan"))
    try:
        with torch.enable_grad():
            for _ in range(opts.act_iters):
                idx = torch.randint(0, n, (min(opts.batch_size, n),), generator=gen)
                out = unit(*_take(args, idx, n), **_take(kwargs, idx, n))
                rec = (_per_sample_err(out, target[idx]) / base[idx]).mean()
                opt.zero_grad(set_to_none=True)
                rec.backward()
                opt.step()
                with torch.no_grad():
                    for p in params:
                        p.clamp_(min=1e-8)
    finally:
        for p in params:
            p.requires_grad_(False)
    loss = float(rec.detach())
    if not math.isfinite(loss):
        raise PtqdError(f"the activation step-size loss is not finite ({loss}) after {opts.act_iters} iterations")
    return loss


def calibrate(
    model: DiffusionModel,
    qnet: nn.Module,
    calib: CalibrationSet,
    opts: CalibrationOptions | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Calibrate the wrapped network ``qnet`` (a quantized copy of ``model.unet``) in place.

    Returns a summary: seconds per phase and per-block reconstruction losses.
    """
    from tqdm import tqdm

    opts = opts or CalibrationOptions()
    opts.validate()
    config = qnet.ptqd_config
    gen = torch.Generator().manual_seed(opts.seed)
    x, t, y = calib.network_inputs(model.null_class)
    check_finite(x, f"calibration: the calibration inputs ({calib.meta.get('model', 'calibration data')})")
    all_inputs = (x, t, y)
    if opts.recon_samples > len(x) and opts.method != "naive":  # a shorthand for "all of them": said, not silent
        print(f"note: --recon-samples {opts.recon_samples} is more than the {len(x)} calibration inputs; "
              f"block reconstruction uses all {len(x)}")
    pick = torch.randperm(len(x), generator=gen)[: opts.recon_samples]
    recon_inputs = (x[pick], t[pick], y[pick] if y is not None else None)
    summary: dict[str, Any] = {"options": asdict(opts), "network_inputs": len(x), "seconds": {}}
    primary = config.act_bits

    t0 = time.perf_counter()
    for lname, layer in [(n, m) for n, m in qnet.named_modules() if isinstance(m, QuantLayer)]:
        for q, w in zip(layer.weight_quantizers, layer.weight_parts()):
            check_finite(w, f"calibration: the weights of layer {lname}")
            q.calibrate(w.detach())
            if not bool(torch.isfinite(q.scale).all()):
                raise PtqdError(f"calibration: the weight quantization scale of layer {lname} is not finite")
    summary["seconds"]["weight_ranges"] = round(time.perf_counter() - t0, 2)

    units: list[tuple[str, nn.Module]] = []
    if opts.method == "qdiff" and (opts.weight_iters > 0 or opts.act_iters > 0):
        units, untraced = ordered_units(model, qnet, opts.block_order)
        summary["block_order"] = opts.block_order
        summary["units"] = [name for name, _ in units]
        if untraced:
            summary["units_not_traced"] = untraced
            if progress:
                print(f"calibration: {len(untraced)} block(s) not called by the traced forward pass, reconstructed last "
                      f"in registration order: {', '.join(untraced)}")
    if opts.method == "qdiff" and opts.weight_iters > 0:
        t0 = time.perf_counter()
        set_quant_state(qnet, weights=True, acts=False)
        losses = {}
        bar = tqdm(units, desc="AdaRound blocks", disable=not progress)
        for name, unit in bar:
            args, kwargs = capture(model, qnet, name, recon_inputs, opts.forward_batch, "inputs")
            target = capture(model, model.unet, name, recon_inputs, opts.forward_batch, "output")
            try:
                losses[name] = reconstruct_weights(unit, args, kwargs, target, opts, gen)
            except PtqdError as e:
                raise PtqdError(f"calibration, AdaRound of block {name}: {e}") from None
            bar.set_postfix(block=name[-24:], loss=f"{losses[name]:.4g}")
        summary["weight_recon_loss"] = losses
        summary["seconds"]["weight_reconstruction"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    set_quant_state(qnet, weights=True, acts=False)
    observe_activations(model, qnet, all_inputs, opts.forward_batch, method=None)
    summary["seconds"]["activation_ranges"] = round(time.perf_counter() - t0, 2)

    if opts.method == "qdiff" and opts.act_iters > 0:
        t0 = time.perf_counter()
        set_quant_state(qnet, weights=True, acts=True)
        losses = {}
        order = [primary] + [b for b in config.act_bit_options if b != primary]
        for bits in order:
            set_act_bits(qnet, bits)
            bar = tqdm(units, desc=f"step sizes A{bits}", disable=not progress)
            for name, unit in bar:
                args, kwargs = capture(model, qnet, name, recon_inputs, opts.forward_batch, "inputs")
                target = capture(model, model.unet, name, recon_inputs, opts.forward_batch, "output")
                try:
                    losses[f"{name}@A{bits}"] = reconstruct_acts(unit, args, kwargs, target, opts, gen, learn_fixed=bits == primary)
                except PtqdError as e:
                    raise PtqdError(f"calibration, A{bits} step sizes of block {name}: {e}") from None
                bar.set_postfix(block=name[-24:], loss=f"{losses[f'{name}@A{bits}']:.4g}")
        set_act_bits(qnet, primary)
        summary["act_recon_loss"] = losses
        summary["seconds"]["activation_reconstruction"] = round(time.perf_counter() - t0, 2)

    set_quant_state(qnet, weights=True, acts=True)
    set_act_bits(qnet, primary)
    return summary
