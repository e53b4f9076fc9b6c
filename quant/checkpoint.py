"""The quantized checkpoint: a self-contained directory that needs no FP checkpoint to load.

    model.safetensors   integer codes, group scales and zero points, LoRA factors, smoothing
                        factors, and the untouched FP tensors (layout below)
    quant_config.json   model, image size, classes, VAE, scheme, bits, storage dtype, per-layer
                        alpha and layout (every stored tensor's dtype)
    report.json         per-layer search losses and errors, wall time per phase
    samples.png         FP (top) vs quantized (bottom) preview from the same noise

Layout (`storage_plan`, the one function that decides what is written; `bench/ckpt_size.py`
computes sizes with it from a model built on the meta device):

    QuantLinear codes    <= 4 bits: two per byte ("uint4x2", low nibble first); else uint8
    QuantLinear weight   not stored (it is dequant(codes, scale, zero))
    scale, smooth        storage dtype (fp16 by default); fp32 for a tensor fp16 cannot hold
                         (overflow, or a nonzero value below fp16's smallest normal 2^-14:
                         these multiply whole groups, so they keep full relative precision)
    zero                 integers: int16 when every value is an integer in int16's range, else fp32
    bias, LoRA L and R   storage dtype; fp32 for a tensor that overflows fp16
    everything else      (the FP part: embedders, adaLN, final layer, pos_embed) storage dtype;
                         fp32 for a tensor that overflows fp16

`round_for_storage(model, dtype)` rounds the in-memory model to exactly what is stored (FP
parameters and buffers, QuantLinear scales -- whose dequantized weight is then recomputed --,
LoRA, bias, smooth), so the model previewed after quantization, the model saved and the model
`load_quantized` returns are the same function bit for bit. save_quantized applies it too.

The directory is written under a temporary name and renamed, so a crash never leaves one
that looks complete. Loading unpickles nothing (safetensors + JSON).
"""
import json
import os
import shutil
from dataclasses import dataclass

import torch

from quant.errors import UserError
from models import DiT_models
from quant.layers import adaln_layers, quantizable_layers
from quant.qlinear import QuantLinear
from quant.quantizer import REFERENCE_GROUP_ROWS, ActQuantConfig, QWeight, WeightQuantConfig, pack_int4, unpack_int4

FORMAT_VERSION = 2
WEIGHTS = "model.safetensors"
CONFIG = "quant_config.json"
REPORT = "report.json"

STORAGE_DTYPES = ("fp16", "fp32")
DEFAULT_STORAGE_DTYPE = "fp16"
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14
_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "int16": torch.int16, "uint8": torch.uint8,
           "uint4x2": torch.uint8}
# QuantLinear tensors that scale whole groups / channels: stored fp16 only with full relative precision
_MULTIPLICATIVE = ("scale", "smooth")
_QLINEAR_LEAVES = ("codes", "scale", "zero", "bias", "lora_L", "lora_R", "smooth")


def is_quantized_checkpoint(path):
    return os.path.isfile(os.path.join(path, CONFIG)) and os.path.isfile(os.path.join(path, WEIGHTS))


# ---------------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class TensorSpec:
    """How one tensor is stored: dtype name (fp16, fp32, int16, uint8, uint4x2, ...) and stored shape."""
    dtype: str
    shape: tuple

    @property
    def nbytes(self):
        n = 1
        for d in self.shape:
            n *= d
        return n * _torch_dtype(self.dtype).itemsize


def _torch_dtype(name):
    return _DTYPES[name] if name in _DTYPES else getattr(torch, name)


def _dtype_name(dtype):
    for name, d in (("fp16", torch.float16), ("fp32", torch.float32), ("int16", torch.int16),
                    ("uint8", torch.uint8)):
        if dtype == d:
            return name
    return str(dtype).removeprefix("torch.")


def _check_storage_dtype(storage_dtype):
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")


def float_storage(t, storage_dtype, multiplicative=False):
    """'fp16' or 'fp32' for float tensor t under --storage-dtype; meta tensors get the nominal choice."""
    if storage_dtype == "fp32" or t.is_meta or t.numel() == 0:
        return storage_dtype
    t = t.detach()
    if not bool(torch.isfinite(t).all()):
        return "fp32"
    h = t.to(torch.float16)
    if bool(torch.isinf(h).any()):
        return "fp32"
    if multiplicative and bool(((h.abs() < FP16_MIN_NORMAL) & (t != 0)).any()):
        return "fp32"
    return "fp16"


def zero_storage(z):
    """'int16' when every zero point is an integer in int16's range (meta: nominal), else 'fp32'."""
    if z.is_meta or z.numel() == 0:
        return "int16"
    z = z.detach()
    if bool(torch.isfinite(z).all()) and bool((z == torch.round(z)).all()) and \
            float(z.min()) >= -32768 and float(z.max()) <= 32767:
        return "int16"
    return "fp32"


def _packs(m):
    return m.weight_cfg.bits <= 4 and m.in_features % 2 == 0


def _qlinears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def storage_plan(model, storage_dtype=DEFAULT_STORAGE_DTYPE):
    """{state key: TensorSpec} of everything save_quantized writes for `model` (QuantLinear layers in
    place). Works on a model built on the meta device (nominal dtypes: fp16/int16 fallbacks are
    value-dependent); on a real model the dtypes are the ones written."""
    _check_storage_dtype(storage_dtype)
    qlin = _qlinears(model)
    plan = {}
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in qlin:
            m = qlin[owner]
            if leaf == "weight":
                continue  # derived from codes, scale and zero
            if leaf == "codes":
                spec = (TensorSpec("uint4x2", (m.out_features, m.in_features // 2)) if _packs(m)
                        else TensorSpec("uint8", tuple(t.shape)))
            elif leaf == "zero":
                spec = TensorSpec(zero_storage(t), tuple(t.shape))
            elif leaf in _QLINEAR_LEAVES:
                spec = TensorSpec(float_storage(t, storage_dtype, leaf in _MULTIPLICATIVE), tuple(t.shape))
            else:
                raise ValueError(f"unexpected QuantLinear tensor {key}")
        elif t.is_floating_point():
            spec = TensorSpec(float_storage(t, storage_dtype), tuple(t.shape))
        else:
            spec = TensorSpec(_dtype_name(t.dtype), tuple(t.shape))
        plan[key] = spec
    return plan


def plan_bytes(plan):
    """Tensor payload bytes of a plan (the file adds safetensors' 8-byte length + JSON header)."""
    return sum(s.nbytes for s in plan.values())


@torch.no_grad()
def round_for_storage(model, storage_dtype=DEFAULT_STORAGE_DTYPE):
    """Round `model` in place to exactly the values save_quantized stores; returns it.

    FP parameters and buffers, QuantLinear scales, LoRA factors, biases and smoothing factors
    planned as fp16 are rounded to fp16 values (dtype unchanged); a QuantLinear's dequantized
    weight is recomputed from its rounded scales. Idempotent. Calibration runs before this,
    on the exact FP weights.
    """
    plan = storage_plan(model, storage_dtype)
    qlin = _qlinears(model)
    for name, m in qlin.items():
        if m.fake_quant_only:
            raise ValueError(f"{name} was folded outside its integer codes; save the unfolded model")
    state = model.state_dict(keep_vars=True)
    for key, spec in plan.items():
        t = state[key]
        if spec.dtype == "fp16" and t.dtype in (torch.float32, torch.float64):
            t.data.copy_(t.data.to(torch.float16))
    for m in qlin.values():
        m.recompute_weight()
    return model


def _stored(t, spec):
    if spec.dtype == "uint4x2":
        return pack_int4(t)
    return t.to(_torch_dtype(spec.dtype))


def quantized_state(model, plan):
    """Tensors to store, cast/packed as the plan says."""
    state = model.state_dict()
    return {key: _stored(state[key].detach(), spec).contiguous().cpu() for key, spec in plan.items()}


def layer_info(m):
    """quant_config.json's description of one QuantLinear (without its dtypes)."""
    w, a = m.weight_cfg, m.act_cfg
    return {"in": m.in_features, "out": m.out_features, "rank": int(m.lora_R.shape[0]),
            "smooth": m.smooth is not None, "bias": m.bias is not None, "packed_int4": _packs(m),
            "weight_bit": w.bits, "group_size": w.group_size, "symmetric": w.symmetric, "scheme": w.scheme,
            "act": None if a is None else {"bits": a.bits, "granularity": a.granularity, "scheme": a.scheme}}


def layer_layout(model, plan):
    """Per-layer description recorded in quant_config.json: shapes, configs, stored dtypes."""
    out = {}
    for name, m in _qlinears(model).items():
        info = layer_info(m)
        info["dtypes"] = {leaf: plan[f"{name}.{leaf}"].dtype for leaf in _QLINEAR_LEAVES if f"{name}.{leaf}" in plan}
        out[name] = info
    return out


def save_quantized(model, meta, report, out_dir, overwrite=False, extra_files=None,
                   storage_dtype=DEFAULT_STORAGE_DTYPE):
    """Write the checkpoint directory atomically (temp dir + rename). extra_files: {name: writer(path)}.

    The model is first rounded in place to what is stored (round_for_storage), so it equals what
    load_quantized returns.
    """
    from safetensors.torch import save_file
    _check_storage_dtype(storage_dtype)
    round_for_storage(model, storage_dtype)
    plan = storage_plan(model, storage_dtype)
    out_dir = os.path.normpath(out_dir)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_file(quantized_state(model, plan), os.path.join(tmp, WEIGHTS))
        layers = layer_layout(model, plan)
        prefixes = tuple(f"{n}." for n in layers)
        meta = dict(meta, format_version=FORMAT_VERSION, storage_dtype=storage_dtype,
                    payload_bytes=plan_bytes(plan), layers=layers,
                    fp_dtypes={k: s.dtype for k, s in plan.items() if not k.startswith(prefixes)})
        _write_json(os.path.join(tmp, CONFIG), meta)
        _write_json(os.path.join(tmp, REPORT), report)
        for fname, writer in (extra_files or {}).items():
            writer(os.path.join(tmp, fname))
        if os.path.exists(out_dir):
            if not overwrite:
                raise UserError(f"{out_dir} already exists; pass --overwrite to replace it")
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


# ---------------------------------------------------------------------------------- skeletons

def _weight_cfg(info, meta):
    return WeightQuantConfig(bits=info.get("weight_bit", meta.get("weight_bit")),
                             group_size=info.get("group_size", meta.get("group_size")),
                             symmetric=info.get("symmetric", False),
                             scheme=info.get("scheme", meta.get("scheme")))


def _act_cfg(info, meta):
    if "act" not in info:  # format 1: the checkpoint's activation settings
        return ActQuantConfig(bits=meta["act_bit"], granularity=meta["act_granularity"], scheme=meta["scheme"])
    a = info["act"]
    return None if a is None else ActQuantConfig(bits=a["bits"], granularity=a["granularity"], scheme=a["scheme"])


def _scale_shape(out, inp, wcfg):
    if wcfg.scheme == "reference":
        return (out // REFERENCE_GROUP_ROWS, inp)
    return (out, inp // (wcfg.group_size or inp))


def skeleton_layer(info, meta=None):
    """A QuantLinear of the described layer with tensors on the meta device."""
    meta = meta or {}
    out, inp, rank = info["out"], info["in"], info["rank"]
    wcfg = _weight_cfg(info, meta)
    with torch.device("meta"):
        sshape = _scale_shape(out, inp, wcfg)
        qw = QWeight(torch.empty(out, inp, dtype=torch.uint8), torch.empty(sshape), torch.empty(sshape), wcfg)
        return QuantLinear(qw, torch.empty(out) if info["bias"] else None, torch.empty(out, rank),
                           torch.empty(rank, inp), torch.empty(inp) if info["smooth"] else None,
                           _act_cfg(info, meta))


def _meta_dit(meta):
    size = meta["image_size"] if meta["vae"] == "none" else meta["image_size"] // 8
    with torch.device("meta"):
        return DiT_models[meta["model"]](input_size=size, in_channels=meta["in_channels"],
                                         num_classes=meta["num_classes"])


def planned_layers(model, cfg):
    """{name: layer info} that quantize_dit(model, cfg) produces (QuantConfig cfg), from shapes only."""
    wcfg, acfg = cfg.weight_cfg(), cfg.act_cfg()
    out = {}
    for name, lin in quantizable_layers(model).items():
        out[name] = {"in": lin.in_features, "out": lin.out_features, "rank": cfg.lora_rank,
                     "smooth": cfg.smoothing != "none", "bias": lin.bias is not None,
                     "weight_bit": wcfg.bits, "group_size": wcfg.group_size, "symmetric": wcfg.symmetric,
                     "scheme": wcfg.scheme,
                     "act": {"bits": acfg.bits, "granularity": acfg.granularity, "scheme": acfg.scheme}}
    if cfg.quantize_adaln:
        from quant.layers import ADALN_WEIGHT_CFG as w
        for name, lin in adaln_layers(model).items():
            out[name] = {"in": lin.in_features, "out": lin.out_features, "rank": 0, "smooth": False,
                         "bias": lin.bias is not None, "weight_bit": w.bits, "group_size": w.group_size,
                         "symmetric": w.symmetric, "scheme": w.scheme, "act": None}
    return out


def skeleton(meta, layers=None):
    """The quantized DiT described by `meta` (model, image_size, vae, in_channels, num_classes) with
    `layers` ({name: info}, default meta["layers"]) as QuantLinear, all on the meta device."""
    model = _meta_dit(meta)
    for name, info in (meta["layers"] if layers is None else layers).items():
        model.set_submodule(name, skeleton_layer(info, meta))
    return model


# ---------------------------------------------------------------------------------- loading

def read_meta(path):
    """quant_config.json of a checkpoint directory; one-line error when it is not one."""
    if not is_quantized_checkpoint(path):
        raise UserError(f"{path} is not a quantized checkpoint directory (no {CONFIG} and {WEIGHTS}); "
                        f"make one with QuantDiT.py")
    try:
        with open(os.path.join(path, CONFIG)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}/{CONFIG} is unreadable ({type(e).__name__})") from None
    for key in ("model", "image_size", "num_classes", "in_channels", "scheme", "weight_bit", "act_bit", "layers"):
        if key not in meta:
            raise UserError(f"{path}/{CONFIG} lacks {key!r}; not a checkpoint of this version")
    if meta.get("format_version", 1) > FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {meta['format_version']}; this version reads up to "
                        f"{FORMAT_VERSION}")
    return meta


def load_quantized(path, device="cpu"):
    """(model, meta): the DiT with QuantLinear layers (smoothing not folded) from a checkpoint dir.

    Every stored tensor is checked against the layout in quant_config.json (shape, incl. packed
    4-bit codes, and dtype); a mismatch is a one-line UserError. Float tensors come back as float32.
    """
    from safetensors.torch import load_file
    meta = read_meta(path)
    if meta["model"] not in DiT_models:
        raise UserError(f"{path} was made for unknown model {meta['model']!r}")
    expected = set(quantizable_layers(_meta_dit(meta)))
    if meta.get("quantize_adaln"):
        expected |= set(adaln_layers(_meta_dit(meta)))
    if expected != set(meta["layers"]):
        raise UserError(f"{path}: its layers do not match {meta['model']}"
                        f"{' with quantized adaLN' if meta.get('quantize_adaln') else ''}")
    try:
        model = skeleton(meta)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}/{CONFIG}: bad layer layout ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    try:
        state = load_file(os.path.join(path, WEIGHTS))
    except Exception as e:
        raise UserError(f"{path}/{WEIGHTS} is unreadable ({type(e).__name__})") from None
    plan = storage_plan(model, meta.get("storage_dtype", "fp32"))
    recorded = {}
    if meta.get("format_version", 1) >= 2:
        recorded = dict(meta.get("fp_dtypes", {}))
        for name, info in meta["layers"].items():
            recorded.update({f"{name}.{leaf}": d for leaf, d in info.get("dtypes", {}).items()})
    for key in state:
        if key not in plan:
            raise UserError(f"{path}/{WEIGHTS} holds {key}, which the config's layout does not")
    values = {}
    for key, spec in plan.items():
        values[key] = _take(state, key, path, spec, recorded.get(key))
    qlin = _qlinears(model)
    for name, m in qlin.items():
        info = meta["layers"][name]
        codes = values[f"{name}.codes"]
        if info.get("packed_int4", False) != (plan[f"{name}.codes"].dtype == "uint4x2"):
            raise UserError(f"{path}/{CONFIG}: {name} says packed_int4={info.get('packed_int4')} for "
                            f"{m.weight_cfg.bits}-bit codes of width {m.in_features}")
        if plan[f"{name}.codes"].dtype == "uint4x2":
            codes = unpack_int4(codes)
        leaf = {k: values.get(f"{name}.{k}") for k in _QLINEAR_LEAVES}
        qw = QWeight(codes, leaf["scale"].float(), leaf["zero"].float(), m.weight_cfg)
        f32 = {k: None if leaf[k] is None else leaf[k].float() for k in ("bias", "lora_L", "lora_R", "smooth")}
        model.set_submodule(name, QuantLinear(qw, f32["bias"], f32["lora_L"], f32["lora_R"], f32["smooth"],
                                              m.act_cfg))
    prefixes = tuple(f"{n}." for n in qlin)
    fp_state = model.state_dict()
    fp = {k: v.to(fp_state[k].dtype) for k, v in values.items() if not k.startswith(prefixes)}
    model.load_state_dict(fp, strict=False, assign=True)
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if missing:
        raise UserError(f"{path}/{WEIGHTS} lacks {missing[0]}")
    return model.to(device).eval(), meta


def _take(state, key, path, spec, recorded_dtype=None):
    if key not in state:
        raise UserError(f"{path}/{WEIGHTS} lacks {key}")
    t = state[key]
    if tuple(t.shape) != tuple(spec.shape):
        raise UserError(f"{path}/{WEIGHTS}: {key} has shape {tuple(t.shape)}, the config says {tuple(spec.shape)}")
    if recorded_dtype is not None:
        want = _torch_dtype(recorded_dtype)
        if t.dtype != want:
            raise UserError(f"{path}/{WEIGHTS}: {key} is {_dtype_name(t.dtype)}, the config says {recorded_dtype}")
    elif spec.dtype in ("uint4x2", "uint8") and t.dtype != torch.uint8:
        raise UserError(f"{path}/{WEIGHTS}: {key} is {_dtype_name(t.dtype)}, integer codes must be uint8")
    return t
