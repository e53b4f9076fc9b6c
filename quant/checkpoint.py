"""The quantized checkpoint: a self-contained directory that needs no FP checkpoint to load.

    model.safetensors   integer codes (4-bit packed two per byte), group scales and zero
                        points, LoRA factors, smoothing factors, and the untouched FP tensors
    quant_config.json   model, image size, classes, VAE, scheme, bits, layout, per-layer alpha
    report.json         per-layer search losses and errors, wall time per phase
    samples.png         FP (top) vs quantized (bottom) preview from the same noise

The directory is written under a temporary name and renamed, so a crash never leaves one
that looks complete. Loading unpickles nothing (safetensors + JSON).
"""
import json
import os
import shutil

import torch

from cli import UserError
from models import DiT_models
from quant.calibrate import quantizable_layers
from quant.qlinear import QuantLinear
from quant.quantizer import ActQuantConfig, QWeight, WeightQuantConfig, pack_int4, unpack_int4

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "quant_config.json"
REPORT = "report.json"


def is_quantized_checkpoint(path):
    return os.path.isfile(os.path.join(path, CONFIG)) and os.path.isfile(os.path.join(path, WEIGHTS))


def _packs(bits):
    return bits <= 4


def quantized_state(model):
    """Tensors to store: QuantLinear codes (packed if <= 4 bits) instead of their float weight."""
    qnames = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    out = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in qnames:
            if leaf == "weight":
                continue  # derived from codes, scale and zero
            if leaf == "codes" and _packs(model.get_submodule(owner).weight_cfg.bits):
                value = pack_int4(value)
        out[key] = value.detach().contiguous().cpu()
    return out


def layer_layout(model):
    """Per-layer description recorded in quant_config.json."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[name] = {"in": m.in_features, "out": m.out_features, "rank": int(m.lora_R.shape[0]),
                         "smooth": m.smooth is not None, "bias": m.bias is not None,
                         "packed_int4": _packs(m.weight_cfg.bits)}
    return out


def save_quantized(model, meta, report, out_dir, overwrite=False, extra_files=None):
    """Write the checkpoint directory atomically (temp dir + rename). extra_files: {name: writer(path)}."""
    from safetensors.torch import save_file
    out_dir = os.path.normpath(out_dir)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_file(quantized_state(model), os.path.join(tmp, WEIGHTS))
        meta = dict(meta, format_version=FORMAT_VERSION, layers=layer_layout(model))
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
    return meta


def load_quantized(path, device="cpu"):
    """(model, meta): the DiT with QuantLinear layers (smoothing not folded) from a checkpoint dir."""
    from safetensors.torch import load_file
    meta = read_meta(path)
    if meta["model"] not in DiT_models:
        raise UserError(f"{path} was made for unknown model {meta['model']!r}")
    size = meta["image_size"] if meta["vae"] == "none" else meta["image_size"] // 8
    with torch.device("meta"):
        model = DiT_models[meta["model"]](input_size=size, in_channels=meta["in_channels"],
                                          num_classes=meta["num_classes"])
    try:
        state = load_file(os.path.join(path, WEIGHTS))
    except Exception as e:
        raise UserError(f"{path}/{WEIGHTS} is unreadable ({type(e).__name__})") from None
    wcfg = WeightQuantConfig(bits=meta["weight_bit"], group_size=meta.get("group_size"), scheme=meta["scheme"])
    acfg = ActQuantConfig(bits=meta["act_bit"], granularity=meta["act_granularity"], scheme=meta["scheme"])
    layers = quantizable_layers(model)
    if set(layers) != set(meta["layers"]):
        raise UserError(f"{path}: its layers do not match {meta['model']}")
    for name, info in meta["layers"].items():
        model.set_submodule(name, _load_layer(state, name, info, wcfg, acfg, path))
    model.load_state_dict(_float_part(state, layers), strict=False, assign=True)
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if missing:
        raise UserError(f"{path}/{WEIGHTS} lacks {missing[0]}")
    return model.to(device).eval(), meta


def _take(state, key, path, shape=None):
    if key not in state:
        raise UserError(f"{path}/{WEIGHTS} lacks {key}")
    t = state[key]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise UserError(f"{path}/{WEIGHTS}: {key} has shape {tuple(t.shape)}, the config says {tuple(shape)}")
    return t


def _load_layer(state, name, info, wcfg, acfg, path):
    out, inp, rank = info["out"], info["in"], info["rank"]
    packed = info["packed_int4"]
    codes = _take(state, f"{name}.codes", path, (out, inp // 2) if packed else (out, inp))
    if packed:
        codes = unpack_int4(codes)
    qweight = QWeight(codes, _take(state, f"{name}.scale", path), _take(state, f"{name}.zero", path), wcfg)
    bias = _take(state, f"{name}.bias", path, (out,)) if info["bias"] else None
    L = _take(state, f"{name}.lora_L", path, (out, rank))
    R = _take(state, f"{name}.lora_R", path, (rank, inp))
    smooth = _take(state, f"{name}.smooth", path, (inp,)) if info["smooth"] else None
    return QuantLinear(qweight, bias, L, R, smooth, acfg)


def _float_part(state, layers):
    prefixes = tuple(f"{name}." for name in layers)
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}
