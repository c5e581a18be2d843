"""Self-contained quantized checkpoints: export a quantization run, load it without the FP weights.

A checkpoint directory (``model.ptqd/``) holds

* ``ptqd_checkpoint.json`` — the manifest: format name and version, the model (diffusers config,
  scheduler config, classes, fingerprint of the FP model it came from), the run's config, every
  quantized layer (geometry, bit-widths, specs, split), the attention quantizers, the noise
  statistics files with their default bit schedule, and a SHA-256 and byte count of every file;
* ``weights.safetensors`` — integer weights (``q − qmin`` as uint8; 4-bit and lower packed two per
  byte), per-output-channel scales and zero points, activation scales per bit-width and zero points,
  and the parameters that stay in float (normalisations, embeddings, biases);
* ``noise_stats_*.safetensors`` (+ ``.json``) — the run's PTQD statistics (fitted arrays and correction
  maps only, no moments);
* ``decoder.safetensors`` — latent models only: the full-precision VQModel/AutoencoderKL that turns
  final latents into images (its config and scaling factor are in the manifest).

How the denoiser is called travels in the manifest too (``adapter``: a UNet2DModel's class ids, a
DiT's class ids and eps half, or a cross-attention context table, stored in ``weights.safetensors``
as ``adapter.context``: a text-to-image checkpoint generates for the prompts it was exported with).
Format version 2 added the adapter and decoder; version 1 checkpoints (pixel UNets) still load.

The manifest is written last, so an interrupted export leaves no loadable checkpoint. Loading checks
format, version, sizes and checksums before reading anything, and refuses damaged files clearly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqd import __version__
from ptqd.errors import PtqdError
from ptqd.integrity import SEAL, check_seal, seal, sha256_file
from ptqd.io import _fsync as _fsync_path, _temp_prefix, atomic_path, check_space, os_error, check_output, dir_with, process_umask, save_safetensors, write_json
from ptqd.locks import holds_lock
from ptqd.models.loading import DiffusionModel
from ptqd.quant.denoiser import QuantizedRun, quant_fingerprint
from ptqd.quant.layers import AttentionQuantizers, QuantAttnProcessor, QuantLayer
from ptqd.quant.quantizer import PASS_BITS, QuantSpec, qrange
from ptqd.quant.wrap import QuantConfig, act_quantizers, quant_layers
from ptqd.runtime.attention import FusedQuantAttnProcessor
from ptqd.runtime.kernels import IntLayer, fast_dtype, integer_weight
from ptqd.runtime.pack import pack_nibbles, unpack_nibbles

FORMAT = "ptqd-quantized-checkpoint"
VERSION = 2
MANIFEST = "ptqd_checkpoint.json"
WEIGHTS = "weights.safetensors"
DECODER = "decoder.safetensors"
BACKENDS = ("int", "fake")


@dataclass
class CheckpointModel(DiffusionModel):
    """A model loaded from a checkpoint: its fingerprint is the FP model's, recorded at export."""

    stored_fingerprint: str = ""

    def fingerprint(self) -> str:
        return self.stored_fingerprint

    def with_prompts(self, prompts: list[str]) -> "DiffusionModel":
        have = f"its {len(self.prompts)} exported prompts" if self.prompts else "no prompts"
        raise PtqdError(
            f"checkpoint {self.path} carries the prompt embeddings it was exported with ({have}), not a text encoder; "
            "sample other prompts from the quantization run directory (`ptqd sample RUN --prompts FILE`)"
        )


CHECKPOINT_DIR = dir_with((MANIFEST, None), (WEIGHTS, None))  # what an earlier (or interrupted) export leaves


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _fsync_dir(path: Path) -> None:
    _fsync_path(path, directory=True)


def _geometry(m: nn.Module) -> dict[str, Any]:
    if isinstance(m, nn.Conv2d):
        return {
            "type": "conv2d", "in": m.in_channels, "out": m.out_channels, "kernel": list(m.kernel_size),
            "stride": list(m.stride), "padding": list(m.padding), "dilation": list(m.dilation),
            "groups": m.groups, "bias": m.bias is not None, "padding_mode": m.padding_mode,
        }
    return {"type": "linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}


def _make_geometry(g: dict[str, Any], device: str | torch.device = "meta") -> nn.Module:
    if g["type"] == "conv2d":
        return nn.Conv2d(g["in"], g["out"], tuple(g["kernel"]), tuple(g["stride"]), tuple(g["padding"]),
                         tuple(g["dilation"]), g["groups"], g["bias"], g.get("padding_mode", "zeros"), device=device)
    return nn.Linear(g["in"], g["out"], g["bias"], device=device)


def runs_integer(m: QuantLayer) -> bool:
    """Whether a layer can run on integer kernels: weights ≤ 8 bit, every activation bit-width ≤ 8."""
    fp = m.fp
    if isinstance(fp, nn.Conv2d) and fp.padding_mode != "zeros":
        return False
    return all(q.bits <= 8 for q in m.weight_quantizers) and all(
        b < PASS_BITS for q in m.act_quantizers for b in q.bit_options
    )


# ------------------------------------------------------------------------------------------ export


@holds_lock("out", "checkpoint directory")
def export(run: QuantizedRun, out: str | Path, progress: bool = True, overwrite: bool = False) -> Path:
    """Write the checkpoint of ``run`` (a :class:`ptqd.quant.denoiser.QuantizedRun`, e.g. from
    ``ptqd.runs.load_run``) to ``out``, with its noise statistics (those in its run directory and
    those collected in memory).

    ``out`` is checked first: a new or empty directory, or an earlier checkpoint (it holds
    ``ptqd_checkpoint.json`` or ``weights.safetensors``); any other existing directory only with ``overwrite``.
    The checkpoint is written into a fresh temporary directory beside ``out`` and swapped in whole, so
    nothing of an earlier checkpoint (e.g. statistics files the run no longer has) is left in it."""

    out = Path(out)
    if not isinstance(run, QuantizedRun):
        raise PtqdError(f"export takes a quantized run (ptqd.runs.load_run(DIR) or ptqd.quantize), got {type(run).__name__}")
    if run.path is not None and out.resolve() == Path(run.path).resolve():
        raise PtqdError("export into a new directory, not into the run directory")
    if run.manifest is not None:
        raise PtqdError("this model was loaded from a checkpoint; export from the quantization run directory")
    check_output(out, kind="dir", overwrite=overwrite, ours=CHECKPOINT_DIR)
    bits = run.config.get("quant", {}).get("weight_bits", 8)
    check_space(out, sum(p.numel() for p in run.base.unet.parameters()) * min(bits, 32) // 8, "checkpoint")  # a lower bound
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), suffix=".tmp", dir=out.parent))  # fits NAME_MAX
        os.chmod(tmp, 0o777 & ~process_umask())  # a directory's usual mode, not mkdtemp's 0700
        _write_checkpoint(run, tmp, out, progress)
        _swap_in(tmp, out)
    except OSError as e:
        raise os_error(e, out) from None  # the partial checkpoint (a temporary directory) is removed below
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _swap_in(new: Path, out: Path) -> None:
    """Put the directory ``new`` at ``out``, replacing what was there (the old one is removed afterwards)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(new, out)
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_checkpoint(run, out: Path, final: Path, progress: bool) -> None:
    """Write the checkpoint files of ``run`` into the (empty) directory ``out``, to be moved to ``final``."""
    from safetensors.torch import save_file

    qnet = run.qnet.cpu()
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    owned: set[str] = set()  # state-dict keys written by the layer records
    for name, m in quant_layers(qnet):
        integer = runs_integer(m)
        rec = {
            "name": name, "integer": integer, "split": m.split, "geometry": _geometry(m.fp),
            "weight_spec": asdict(m.weight_quantizers[0].spec), "act_spec": asdict(m.act_quantizers[0].spec),
            "act_bits": m.act_quantizers[0].bit_options, "fixed_act": m.act_quantizers[0].fixed, "parts": [],
        }
        for i, (wq, w) in enumerate(zip(m.weight_quantizers, m.weight_parts())):
            w = w.detach().float()
            if integer:
                q, scale, zp = integer_weight(wq, w)
                shape = (-1, *[1] * (w.ndim - 1))
                simulated = wq(w)
                if not torch.allclose((q.float() - zp.reshape(shape)) * scale.reshape(shape), simulated, atol=1e-6, rtol=1e-5):
                    raise PtqdError(f"layer {name}: integer weights do not reproduce the simulated weights (please report)")
                qmin, _ = qrange(wq.bits, wq.spec.symmetric)
                u = (q - qmin).to(torch.uint8)
                tensors[f"int.{name}.{i}.q"] = pack_nibbles(u) if wq.bits <= 4 else u.reshape(-1).contiguous()
                tensors[f"int.{name}.{i}.scale"] = scale.contiguous()
                tensors[f"int.{name}.{i}.zero_point"] = zp.to(torch.int16).contiguous()
                rec["parts"].append({"shape": list(w.shape), "bits": wq.bits, "qmin": qmin, "packed": wq.bits <= 4})
            else:  # stays simulated: the fake-quantized float weight and its quantizer
                tensors[f"sim.{name}.{i}.weight"] = (wq(w) if wq.enabled else w).contiguous()
                for k, v in wq.state().items():
                    if k != "round_up":  # the stored weight is on the grid: nearest rounding reproduces it
                        tensors[f"sim.{name}.{i}.{k}"] = v.float().contiguous()
                rec["parts"].append({"shape": list(w.shape), "bits": wq.bits, "simulated": True})
        owned.add(f"{name}.fp.weight")
        layers.append(rec)
    for name, aq in act_quantizers(qnet):
        if not aq.calibrated:
            raise PtqdError(f"activation quantizer {name} is not calibrated; export a finished run")
        for k, v in aq.state().items():
            tensors[f"act.{name}.{k}"] = v.detach().float().reshape(-1).contiguous()
    attention = []
    for name, m in qnet.named_modules():
        if isinstance(getattr(m, "ptqd_quant", None), AttentionQuantizers):
            qz = m.ptqd_quant
            attention.append({"name": name, "act_spec": asdict(qz.q.spec), "act_bits": qz.q.bit_options, "softmax_spec": asdict(qz.softmax.spec)})
    quant_names = {n for n, _ in quant_layers(qnet)}
    for key, v in qnet.state_dict().items():
        if key in owned or any(p in key.split(".") for p in ("weight_quantizers", "act_quantizers", "ptqd_quant")):
            continue
        owner, _, leaf = key.rpartition(".")
        if owner.endswith(".fp") and owner[:-3] in quant_names:
            key = f"{owner[:-3]}.{leaf}"
        tensors[f"float.{key}"] = v.detach().contiguous()

    fp = run.base
    adapter = _adapter_record(fp, tensors)
    save_safetensors(tensors, out / WEIGHTS, metadata={"format": FORMAT, "version": str(VERSION)})  # sorted: same run, same bytes
    stats_entries = _export_stats(run, out)
    files = {WEIGHTS: None, **{e["file"]: None for e in stats_entries}, **{e["table"]: None for e in stats_entries}}
    decoder = None
    (out / DECODER).unlink(missing_ok=True)
    if fp.decoder is not None:
        vae = fp.decoder.vae
        with atomic_path(out / DECODER) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}, str(tmp))
        decoder = {"class_name": type(vae).__name__, "config": json.loads(json.dumps(dict(vae.config), default=_jsonable)),
                   "scaling_factor": fp.decoder.scaling_factor, "file": DECODER}
        files[DECODER] = None
    unet_cfg = dict(getattr(fp.unet, "config", {}))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "ptqd": __version__,
        "model": {
            "name": fp.name, "fingerprint": fp.fingerprint(), "class_name": type(fp.unet).__name__,
            "num_classes": fp.num_classes, "null_class": fp.null_class, "image_size": fp.image_size,
            "channels": fp.channels, "info": fp.info, "prompts": fp.prompts,
        },
        "adapter": adapter,
        "decoder": decoder,
        "unet_config": json.loads(json.dumps(unet_cfg, default=_jsonable)),
        "scheduler_config": fp.scheduler_config,
        "run": run.config,
        "quant_fingerprint": quant_fingerprint(run.qnet),
        "layers": layers,
        "attention": attention,
        "noise_stats": stats_entries,
        "files": {f: {"sha256": sha256_file(out / f), "bytes": (out / f).stat().st_size} for f in files},
    }
    fp32_bytes = 4 * sum(p.numel() for p in fp.unet.parameters() if p.is_floating_point() and p.device.type != "meta")
    manifest["size"] = {"weights_bytes": manifest["files"][WEIGHTS]["bytes"], "fp32_param_bytes": fp32_bytes}
    write_json(out / MANIFEST, seal(manifest))
    if progress:
        total = sum(v["bytes"] for v in manifest["files"].values()) + (out / MANIFEST).stat().st_size
        w = manifest["size"]["weights_bytes"]
        print(
            f"wrote {final}: weights {w / 1e6:.3f} MB ({w / fp32_bytes:.3f}× the fp32 parameters, {fp32_bytes / 1e6:.2f} MB), "
            f"{total / 1e6:.3f} MB in all; {sum(r['integer'] for r in layers)}/{len(layers)} layers on integer kernels, "
            f"{len(stats_entries)} noise statistics file(s)"
        )


def _adapter_record(fp: DiffusionModel, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """How the denoiser is called (``fp.adapter``), for the manifest; a context table goes into ``tensors``."""
    from ptqd.models.adapters import ContextAdapter, DiTAdapter, UNetAdapter

    a = fp.adapter
    if isinstance(a, ContextAdapter):
        tensors["adapter.context"] = a.context.detach().float().cpu().contiguous()
        return {"kind": a.kind, "source": a.source, "names": a.names}
    if isinstance(a, DiTAdapter):
        return {"kind": a.kind, "eps_channels": a.eps_channels, "learned_sigma": a.learned_sigma}
    if type(a) is UNetAdapter:
        return {"kind": a.kind}
    raise PtqdError(f"cannot export a model called through {type(a).__name__}; ptqd checkpoints know UNet, DiT and cross-attention denoisers")


def _make_adapter(manifest: dict, tensors: dict, path: Path):
    from ptqd.models.adapters import ContextAdapter, DiTAdapter, UNetAdapter

    rec = manifest.get("adapter") or {"kind": "unet"}  # version 1: pixel UNets only
    kind = rec.get("kind")
    if kind == "unet":
        return UNetAdapter()
    if kind == "dit":
        return DiTAdapter(int(rec["eps_channels"]), bool(rec["learned_sigma"]))
    if kind == "cross-attention":
        return ContextAdapter(_tensor(tensors, "adapter.context", path).float(), rec.get("names"), rec.get("source", "context"))
    raise PtqdError(f"{path / MANIFEST}: unknown denoiser adapter {kind!r}; upgrade ptqd or export the checkpoint again")


def _make_decoder(manifest: dict, path: Path):
    """The FP latent decoder stored with the checkpoint (None for pixel models)."""
    rec = manifest.get("decoder")
    if not rec:
        return None
    import diffusers
    from safetensors.torch import load_file

    from ptqd.models.adapters import LatentDecoder

    cls = getattr(diffusers, rec["class_name"], None)
    if cls is None:
        raise PtqdError(f"{path / MANIFEST}: decoder class {rec['class_name']!r} is not in this diffusers version")
    f = path / rec["file"]
    try:
        state = load_file(str(f))
    except Exception as e:
        raise PtqdError(f"{f} is unreadable ({e}); export the checkpoint again") from e
    cfg = {k: v for k, v in rec["config"].items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            vae = cls.from_config(cfg)
        if _meta_left(vae, set(vae.state_dict())):  # buffers the state dict does not hold: build normally
            vae = cls.from_config(cfg)
        vae.load_state_dict(state, assign=True)
    except Exception as e:
        raise PtqdError(f"{f} does not fit a {rec['class_name']} with the manifest's config ({e}); export the checkpoint again") from e
    left = _meta_left(vae)
    if left:
        raise PtqdError(f"{f} leaves {len(left)} decoder tensors unset (e.g. {left[:3]}); export the checkpoint again")
    return LatentDecoder(vae.float(), float(rec["scaling_factor"]))


def _jsonable(v):
    if isinstance(v, (tuple, set)):
        return list(v)
    return str(v)


def _export_stats(run, out: Path) -> list[dict[str, Any]]:
    """Copy the run's noise statistics (fitted arrays, no moments) and record their default bit schedule."""
    from ptqd.correction.apply import schedule_for
    from ptqd.correction.apply import stats_name_for as stats_name_of
    from ptqd.correction.mixed import DEFAULT_CRITERION, describe_schedule
    from ptqd.correction.stats import load_stats, save_stats
    from ptqd.sampling import SamplerConfig

    entries = []
    sources = []
    if run.path is not None:
        sources = [load_stats(src) for src in sorted(Path(run.path).glob("noise_stats_*.safetensors"))
                   if not src.name.endswith(".partial.safetensors")]
    named = {stats_name_of(s) for s in sources}
    held = run.stats if isinstance(run.stats, list) else [run.stats]
    for extra in [s for s in held if s is not None]:  # collected in memory (ptqd.quantize / ptqd.plan without a directory)
        if stats_name_of(extra) not in named:
            sources.append(extra)
    for stats in sources:
        src = Path(stats_name_of(stats))
        stats = dataclasses.replace(stats, moments=None, heldout=None)  # the fitted maps and their scores stay
        from ptqd.correction.apply import guards_of

        guards = guards_of(run, stats)  # the final-sample guards fitted in the run: the checkpoint samples as the run did
        if guards:
            stats.meta = {**stats.meta, "guards": guards}
        save_stats(stats, out / src.name)
        m = stats.meta
        entry = {
            "file": src.name, "table": src.with_suffix(".json").name, "bits": stats.bits,
            "scheduler": m.get("scheduler"), "steps": m.get("steps"), "eta": m.get("eta"), "guidance": m.get("guidance"),
        }
        if len(stats.bits) > 1:
            sampler = SamplerConfig(m["scheduler"], m["steps"], m["eta"] if m["eta"] is not None else 1.0, m.get("guidance") or 1.0)
            schedule = schedule_for(run, stats, sampler)
            entry["bit_schedule"] = {"criterion": DEFAULT_CRITERION, "text": describe_schedule(schedule), "bits": {str(t): b for t, b in schedule.items()}}
        entries.append(entry)
    return entries


# ------------------------------------------------------------------------------------------ load


def read_manifest(path: str | Path, verify: bool = True, require_seal: bool = True) -> dict[str, Any]:
    """The checked manifest of checkpoint ``path`` (files' sizes and SHA-256 verified with ``verify``)."""
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise PtqdError(f"checkpoint {path} does not exist or is not a directory; make one with `ptqd export RUN --out {path}`")
    if not mf.is_file():
        raise PtqdError(f"{path} is not a ptqd checkpoint (no {MANIFEST}); export one with `ptqd export RUN --out {path}`")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PtqdError(f"{mf} is damaged ({e}); export the checkpoint again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PtqdError(f"{mf} is not a ptqd checkpoint manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or version < 1:
        raise PtqdError(f"{mf} has an invalid format version {version!r}; export the checkpoint again")
    if version > VERSION:
        raise PtqdError(f"{path} has checkpoint format version {version}, but this ptqd ({__version__}) reads up to version {VERSION}; upgrade ptqd")
    for key in ("model", "unet_config", "scheduler_config", "run", "layers", "attention", "files", "quant_fingerprint"):
        if key not in manifest:
            raise PtqdError(f"{mf} lacks the field {key!r}; export the checkpoint again")
    if WEIGHTS not in manifest["files"]:
        raise PtqdError(f"{mf} lists no {WEIGHTS}; export the checkpoint again")
    if verify:
        for name, info in manifest["files"].items():
            f = path / name
            if not f.is_file():
                raise PtqdError(f"checkpoint file {f} is missing; copy the whole checkpoint directory or export it again")
            size = f.stat().st_size
            if size != info["bytes"]:
                raise PtqdError(f"checkpoint file {f} is truncated or altered: {size} bytes, the manifest says {info['bytes']}; export it again")
            if sha256_file(f) != info["sha256"]:
                raise PtqdError(f"checkpoint file {f} is corrupt: SHA-256 checksum mismatch with the manifest; export it again")
        if not check_seal(manifest, mf, "undo the edit or export the checkpoint again") and require_seal:
            raise PtqdError(
                f"{mf} has no checksum of its own ({SEAL}; an older ptqd made it, or it was edited): run `ptqd upgrade {path}` "
                "to check what can be checked and add one, or export the checkpoint again"
            )
    return manifest


def upgrade_checkpoint(path: str | Path) -> dict[str, Any]:
    """Seal an unsealed checkpoint manifest after checking its files and loading it (see ``ptqd upgrade``)."""
    path = Path(path)
    mf = path / MANIFEST
    manifest = read_manifest(path, verify=True, require_seal=False)
    if SEAL in manifest:
        load_checkpoint(path)
        return {"path": str(path), "upgraded": False, "note": f"{mf} already has its checksum; it was checked"}
    original = mf.read_bytes()
    write_json(mf, seal(manifest))
    try:
        load_checkpoint(path)  # every field, tensor and geometry check of a normal load
    except BaseException:
        with atomic_path(mf) as tmp:
            tmp.write_bytes(original)
        raise
    return {"path": str(path), "upgraded": True, "files": sorted(manifest["files"])}


def _tensor(tensors: dict, key: str, path: Path) -> torch.Tensor:
    if key not in tensors:
        raise PtqdError(f"{path / WEIGHTS} lacks tensor {key!r}; the checkpoint is incomplete, export it again")
    return tensors[key]


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _spec(d: dict) -> QuantSpec:
    return QuantSpec(**d)


def load_checkpoint(path: str | Path, backend: str = "int"):
    """A :class:`ptqd.runs.QuantizedRun` rebuilt from checkpoint ``path`` without the FP weights.

    ``backend="int"``: quantized layers run integer kernels (attention products: quantized values in
    float, tiled, see :mod:`ptqd.runtime.attention`); ``"fake"``: the simulated model (fake
    quantization in float), numerically the run's quantized model. The diffusers model is built on
    the meta device and filled from the checkpoint (models with state the checkpoint cannot hold,
    e.g. non-persistent buffers, are built normally).
    """
    from safetensors.torch import load_file

    if backend not in BACKENDS:
        raise PtqdError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    path = Path(path)
    manifest = read_manifest(path)
    try:
        tensors = load_file(str(path / WEIGHTS))
    except Exception as e:
        raise PtqdError(f"{path / WEIGHTS} is unreadable ({e}); export the checkpoint again") from e
    check_geometry(manifest, tensors, path)
    net = _build_net(manifest, device="meta")  # no float weights are allocated for the quantized layers
    if _meta_left(net, set(net.state_dict())):  # state the config builds but the checkpoint cannot hold
        net = _build_net(manifest)
    float_state = {k[len("float."):]: v for k, v in tensors.items() if k.startswith("float.")}
    expected = set(net.state_dict())
    layer_weights = {f"{r['name']}.weight" for r in manifest["layers"]}
    missing = sorted(expected - set(float_state) - layer_weights)
    unexpected = sorted(set(float_state) - expected)
    if missing or unexpected:
        raise PtqdError(
            f"{path / WEIGHTS} does not fit a {manifest['model']['class_name']} with this config: "
            f"{len(missing)} missing tensors (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    try:
        net.load_state_dict(float_state, strict=False, assign=True)
    except RuntimeError as e:
        raise PtqdError(f"{path / WEIGHTS} does not fit the model the manifest's unet_config builds ({str(e).splitlines()[-1].strip()}); "
                        "export the checkpoint again") from None
    for rec in manifest["layers"]:
        _install_layer(net, rec, tensors, backend, path)
    left = _meta_left(net)
    if left:
        raise PtqdError(f"{path / WEIGHTS} leaves {len(left)} tensors of the model unset (e.g. {left[:3]}); export the checkpoint again")
    for rec in manifest["attention"]:
        attn = net.get_submodule(rec["name"])
        attn.ptqd_quant = AttentionQuantizers(_spec(rec["act_spec"]), rec["act_bits"], _spec(rec["softmax_spec"]))
        attn.set_processor(FusedQuantAttnProcessor() if backend == "int" else QuantAttnProcessor())
    for name, aq in act_quantizers(net):
        state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"act.{name}.") and "." not in k[len(f"act.{name}.") :]}
        if "zero_point" not in state:
            raise PtqdError(f"{path / WEIGHTS} lacks the activation quantizer {name}; export the checkpoint again")
        aq.load_state(state)
    run_config = manifest["run"]
    net.ptqd_config = QuantConfig.from_dict(run_config["quant"])
    net.ptqd_quant_fingerprint = manifest["quant_fingerprint"]
    net.ptqd_backend = backend
    net.eval().requires_grad_(False)
    if backend == "int":
        fast_dtype(net)  # diffusers' dtype property scans every module on each call
    m = manifest["model"]
    model = CheckpointModel(
        name=m["name"], unet=net, scheduler_config=manifest["scheduler_config"], num_classes=m["num_classes"],
        null_class=m["null_class"], image_size=m["image_size"], channels=m["channels"], path=path,
        info={**m.get("info", {}), "checkpoint": str(path), "backend": backend}, stored_fingerprint=m["fingerprint"],
        adapter=_make_adapter(manifest, tensors, path), decoder=_make_decoder(manifest, path), prompts=m.get("prompts"),
    )
    return QuantizedRun(model, net, run_config, path, {"size": manifest.get("size", {})}, manifest=manifest)


def check_geometry(manifest: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The manifest's layer records and class count against the stored tensors, before any layer is built."""
    mf = path / MANIFEST
    fix = "undo the edit or export the checkpoint again"

    def bad(field: str, problem: str) -> PtqdError:
        return PtqdError(f"{mf}: field {field!r} {problem}; {fix}")

    for li, rec in enumerate(manifest["layers"]):
        name, g = rec.get("name"), rec.get("geometry") or {}
        where = f"layers[{li}] ({name})"
        try:
            w_spec = _spec(rec["weight_spec"])
            parts = rec["parts"]
            kind, g_in, g_out = g["type"], int(g["in"]), int(g["out"])
        except (KeyError, TypeError, ValueError) as e:
            raise bad(where, f"is incomplete or malformed ({type(e).__name__}: {e})") from None
        if kind not in ("conv2d", "linear") or not parts:
            raise bad(f"{where}.geometry", f"has type {kind!r} and {len(parts)} parts")
        groups = int(g.get("groups", 1)) if kind == "conv2d" else 1
        tail = tuple(g["kernel"]) if kind == "conv2d" else ()
        cols = 0
        for i, part in enumerate(parts):
            shape = tuple(part["shape"])
            if len(shape) != 2 + len(tail) or shape[0] != g_out or shape[2:] != tail:
                raise bad(f"{where}.parts[{i}].shape", f"is {list(shape)}, which does not fit the geometry ({kind} {g_in}→{g_out}"
                                                       f"{', kernel ' + str(list(tail)) if tail else ''})")
            cols += shape[1]
            numel = int(torch.Size(shape).numel())
            if part.get("simulated"):
                w = _tensor(tensors, f"sim.{name}.{i}.weight", path)
                if w.numel() != numel:
                    raise bad(f"{where}.parts[{i}].shape", f"is {list(shape)}, but the stored weight has {w.numel()} values")
                continue
            bits = int(part["bits"])
            qmin, _ = qrange(bits, w_spec.symmetric)
            if part.get("qmin") != qmin:
                raise bad(f"{where}.parts[{i}].qmin", f"is {part.get('qmin')!r}, but {bits}-bit {'symmetric' if w_spec.symmetric else 'asymmetric'} "
                                                      f"weights have qmin {qmin}")
            if bool(part.get("packed")) != (bits <= 4):
                raise bad(f"{where}.parts[{i}].packed", f"is {part.get('packed')!r} for {bits}-bit weights")
            raw = _tensor(tensors, f"int.{name}.{i}.q", path)
            stored = raw.numel() if bits > 4 else None
            if (bits > 4 and stored != numel) or (bits <= 4 and raw.numel() != (numel + 1) // 2):
                raise bad(f"{where}.parts[{i}].shape", f"is {list(shape)} ({numel} weights), but {WEIGHTS} stores {raw.numel()} bytes for them")
            scale = _tensor(tensors, f"int.{name}.{i}.scale", path)
            if scale.numel() not in (1, shape[0]):
                raise bad(f"{where}.parts[{i}]", f"has {scale.numel()} weight scales for {shape[0]} output channels")
        if cols * groups != g_in:
            raise bad(f"{where}.geometry.in", f"is {g_in}, but the weights take {cols * groups} input channels")
    m = manifest["model"]
    try:
        num_classes, null = int(m.get("num_classes") or 0), m.get("null_class")
    except (TypeError, ValueError):
        raise bad("model.num_classes", f"is {m.get('num_classes')!r}, not an integer") from None
    table = next((k for k in sorted(tensors) if k.endswith(("class_embedding.weight", "embedding_table.weight"))), None)
    if "adapter.context" in tensors:
        table = "adapter.context"
    if table is not None and num_classes:
        rows = int(tensors[table].shape[0])
        need = num_classes + (1 if null is not None and int(null) >= num_classes else 0)
        if need > rows or (null is not None and not 0 <= int(null) < rows):
            raise bad("model.num_classes", f"is {num_classes} (null class {null}), but the class table {table} has {rows} rows")


def _meta_left(net: nn.Module, persistent: set[str] | None = None) -> list[str]:
    """Names of parameters/buffers still on the meta device (only those outside ``persistent``, if given:
    buffers a model creates in ``__init__`` without saving them, which meta construction would lose)."""
    names = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    return names if persistent is None else [n for n in names if n not in persistent]


def _build_net(manifest: dict, device: str = "cpu") -> nn.Module:
    import diffusers

    cls_name = manifest["model"]["class_name"]
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise PtqdError(f"checkpoint model class {cls_name!r} is not in this diffusers version")
    cfg = {k: v for k, v in manifest["unet_config"].items() if not k.startswith("_")}
    try:
        with torch.device(device):
            return cls.from_config(cfg)
    except Exception as e:
        raise PtqdError(f"cannot build {cls_name} from the checkpoint's config: {e}") from e


def _install_layer(net: nn.Module, rec: dict, tensors: dict, backend: str, path: Path) -> None:
    name = rec["name"]
    g = rec["geometry"]
    w_spec, a_spec = _spec(rec["weight_spec"]), _spec(rec["act_spec"])
    bias = tensors.get(f"float.{name}.bias") if g["bias"] else None
    if g["bias"] and bias is None:
        raise PtqdError(f"{path / WEIGHTS} lacks the bias of {name}; export the checkpoint again")
    weights, qparams = [], []
    for i, part in enumerate(rec["parts"]):
        shape = tuple(part["shape"])
        numel = int(torch.Size(shape).numel())
        if part.get("simulated"):
            weights.append(_tensor(tensors, f"sim.{name}.{i}.weight", path).reshape(shape))
            qparams.append({"scale": _tensor(tensors, f"sim.{name}.{i}.scale", path), "zero_point": _tensor(tensors, f"sim.{name}.{i}.zero_point", path)})
            continue
        raw = _tensor(tensors, f"int.{name}.{i}.q", path)
        u = unpack_nibbles(raw, numel) if part["packed"] else raw
        if u.numel() != numel:
            raise PtqdError(f"{path / WEIGHTS}: weights of {name} have {u.numel()} values, expected {numel}")
        q = u.to(torch.int16).reshape(shape) + part["qmin"]
        scale = _tensor(tensors, f"int.{name}.{i}.scale", path).float()
        zp = _tensor(tensors, f"int.{name}.{i}.zero_point", path).float()
        weights.append((q, scale, zp))
    if rec["integer"] and backend == "int":
        layer = IntLayer(_make_geometry(g), w_spec, a_spec, rec["act_bits"], rec["fixed_act"], rec["split"])
        layer.set_integer_weights(weights, bias)
    else:
        fp = _make_geometry(g, device="cpu")
        parts = []
        for w in weights:
            if isinstance(w, tuple):
                q, scale, zp = w
                sh = (-1, *[1] * (q.ndim - 1))
                parts.append((q.float() - zp.reshape(sh)) * scale.reshape(sh))
            else:
                parts.append(w.float())
        with torch.no_grad():
            fp.weight.copy_(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
            if bias is not None:
                fp.bias.copy_(bias)
        fp.requires_grad_(False)
        layer = QuantLayer(fp, w_spec, a_spec, rec["act_bits"], rec["fixed_act"], rec["split"])
        for i, (wq, w) in enumerate(zip(layer.weight_quantizers, weights)):
            if isinstance(w, tuple):
                _, scale, zp = w
                sh = (-1, *[1] * (len(rec["parts"][i]["shape"]) - 1))
                wq.load_state({"scale": scale.reshape(sh), "zero_point": zp.reshape(sh)})
            else:
                wq.load_state(qparams[i])
    layer.ptqd_name = name
    _set_module(net, name, layer)
