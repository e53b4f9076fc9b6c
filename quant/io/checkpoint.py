"""The quantized checkpoint: a self-contained directory that needs no FP checkpoint to load.

    model.safetensors   integer codes, group scales and zero points, LoRA factors, smoothing
                        factors, and the untouched FP tensors (layout below)
    quant_config.json   model, image size, classes, VAE, scheme, bits, storage dtype, per-layer
                        alpha and layout (every stored tensor's dtype)
    report.json         per-layer search losses and errors, wall time per phase
    samples.png         FP (top) vs quantized (bottom) preview from the same noise

The tensor layout (what is stored in which dtype, and `round_for_storage`) is quant/io/storage.py's.

The directory is written under a temporary name and renamed, so a crash never leaves one
that looks complete. Loading unpickles nothing (safetensors + JSON).
"""
import json
import os
import shutil

import torch

# upstream DiT's module structure (models.py) is what gets quantized: loading builds its skeleton
from models import DiT_models
from quant.errors import UserError
from quant.io.files import atomic_path, write_json
from quant.method.layers import adaln_layers, quantizable_layers
from quant.nn.qlinear import QuantLinear
from quant.method.quantizer import REFERENCE_GROUP_ROWS, QWeight, unpack_int4
from quant.quant_config import ActQuantConfig, WeightQuantConfig
from quant.method.rotation import rotated_skeleton
from quant.io.storage import (DEFAULT_STORAGE_DTYPE, QLINEAR_LEAVES, check_storage_dtype, dtype_name, layer_layout,
                           plan_bytes, qlinears, quantized_state, round_for_storage, storage_plan, torch_dtype)

FORMAT_VERSION = 2
WEIGHTS = "model.safetensors"
CONFIG = "quant_config.json"
REPORT = "report.json"


def is_quantized_checkpoint(path):
    return os.path.isfile(os.path.join(path, CONFIG)) and os.path.isfile(os.path.join(path, WEIGHTS))


def save_quantized(model, meta, report, out_dir, overwrite=False, extra_files=None,
                   storage_dtype=DEFAULT_STORAGE_DTYPE):
    """Write the checkpoint directory atomically (temp dir + rename). extra_files: {name: writer(path)}.

    The model is first rounded in place to what is stored (round_for_storage), so it equals what
    load_quantized returns.
    """
    from safetensors.torch import save_file
    check_storage_dtype(storage_dtype)
    round_for_storage(model, storage_dtype)
    plan = storage_plan(model, storage_dtype)
    out_dir = os.path.normpath(out_dir)
    with atomic_path(out_dir) as tmp:
        os.makedirs(tmp)
        save_file(quantized_state(model, plan), os.path.join(tmp, WEIGHTS))
        layers = layer_layout(model, plan)
        prefixes = tuple(f"{n}." for n in layers)
        meta = dict(meta, format_version=FORMAT_VERSION, storage_dtype=storage_dtype,
                    payload_bytes=plan_bytes(plan), layers=layers,
                    fp_dtypes={k: s.dtype for k, s in plan.items() if not k.startswith(prefixes)})
        write_json(os.path.join(tmp, CONFIG), meta)
        write_json(os.path.join(tmp, REPORT), report)
        for fname, writer in (extra_files or {}).items():
            writer(os.path.join(tmp, fname))
        if os.path.exists(out_dir):
            if not overwrite:
                raise UserError(f"{out_dir} already exists; pass --overwrite to replace it")
            shutil.rmtree(out_dir)
    return out_dir


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
                           _act_cfg(info, meta), info.get("lora_input", "quantized"))


def _meta_dit(meta):
    size = meta["image_size"] if meta["vae"] == "none" else meta["image_size"] // 8
    with torch.device("meta"):
        return DiT_models[meta["model"]](input_size=size, in_channels=meta["in_channels"],
                                         num_classes=meta["num_classes"])


def planned_layers(model, cfg):
    """{name: layer info} that quantize_dit(model, cfg) produces (QuantConfig cfg), from shapes only. With smoothing
    select the layout is the kept option's (smoothing factors or none): plan one of cfg.options()."""
    if cfg.smoothing == "select":
        raise ValueError("a smoothing select checkpoint has the layout of the option it keeps: plan one of "
                         "cfg.options()")
    wcfg, acfg = cfg.weight_cfg(), cfg.act_cfg()
    out = {}
    for name, lin in quantizable_layers(model).items():
        out[name] = {"in": lin.in_features, "out": lin.out_features, "rank": cfg.lora_rank,
                     "smooth": cfg.smoothing != "none", "bias": lin.bias is not None or cfg.bias_correction,
                     "weight_bit": wcfg.bits, "group_size": wcfg.group_size, "symmetric": wcfg.symmetric,
                     "scheme": wcfg.scheme,
                     "act": {"bits": acfg.bits, "granularity": acfg.granularity, "scheme": acfg.scheme}}
        if cfg.lora_order == "svd_first":
            out[name]["lora_input"] = "smoothed"
    if cfg.quantize_adaln:
        from quant.method.layers import ADALN_WEIGHT_CFG as w
        for name, lin in adaln_layers(model).items():
            out[name] = {"in": lin.in_features, "out": lin.out_features, "rank": 0, "smooth": False,
                         "bias": lin.bias is not None, "weight_bit": w.bits, "group_size": w.group_size,
                         "symmetric": w.symmetric, "scheme": w.scheme, "act": None}
    return out


def skeleton(meta, layers=None):
    """The quantized DiT described by `meta` (model, image_size, vae, in_channels, num_classes) with
    `layers` ({name: info}, default meta["layers"]) as QuantLinear, all on the meta device."""
    model = _meta_dit(meta)
    if meta.get("hadamard"):  # the online rotation of fc2's input (the rotated weights are stored)
        rotated_skeleton(model)
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
    qlin = qlinears(model)
    for name, m in qlin.items():
        info = meta["layers"][name]
        codes = values[f"{name}.codes"]
        if info.get("packed_int4", False) != (plan[f"{name}.codes"].dtype == "uint4x2"):
            raise UserError(f"{path}/{CONFIG}: {name} says packed_int4={info.get('packed_int4')} for "
                            f"{m.weight_cfg.bits}-bit codes of width {m.in_features}")
        if plan[f"{name}.codes"].dtype == "uint4x2":
            codes = unpack_int4(codes)
        leaf = {k: values.get(f"{name}.{k}") for k in QLINEAR_LEAVES}
        qw = QWeight(codes, leaf["scale"].float(), leaf["zero"].float(), m.weight_cfg)
        f32 = {k: None if leaf[k] is None else leaf[k].float() for k in ("bias", "lora_L", "lora_R", "smooth")}
        model.set_submodule(name, QuantLinear(qw, f32["bias"], f32["lora_L"], f32["lora_R"], f32["smooth"],
                                              m.act_cfg, m.lora_input))
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
        want = torch_dtype(recorded_dtype)
        if t.dtype != want:
            raise UserError(f"{path}/{WEIGHTS}: {key} is {dtype_name(t.dtype)}, the config says {recorded_dtype}")
    elif spec.dtype in ("uint4x2", "uint8") and t.dtype != torch.uint8:
        raise UserError(f"{path}/{WEIGHTS}: {key} is {dtype_name(t.dtype)}, integer codes must be uint8")
    return t
