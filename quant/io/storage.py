"""How a quantized DiT is stored: the tensor layout of model.safetensors (quant/io/checkpoint.py writes it).

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
"""
from dataclasses import dataclass

import torch

from quant.nn.qlinear import QuantLinear
from quant.method.quantizer import pack_int4

STORAGE_DTYPES = ("fp16", "fp32")
DEFAULT_STORAGE_DTYPE = "fp16"
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14
_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "int16": torch.int16, "uint8": torch.uint8,
           "uint4x2": torch.uint8}
# QuantLinear tensors that scale whole groups / channels: stored fp16 only with full relative precision
_MULTIPLICATIVE = ("scale", "smooth")
QLINEAR_LEAVES = ("codes", "scale", "zero", "bias", "lora_L", "lora_R", "smooth")


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
        return n * torch_dtype(self.dtype).itemsize


def torch_dtype(name):
    return _DTYPES[name] if name in _DTYPES else getattr(torch, name)


def dtype_name(dtype):
    for name, d in (("fp16", torch.float16), ("fp32", torch.float32), ("int16", torch.int16),
                    ("uint8", torch.uint8)):
        if dtype == d:
            return name
    return str(dtype).removeprefix("torch.")


def check_storage_dtype(storage_dtype):
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


def qlinears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def storage_plan(model, storage_dtype=DEFAULT_STORAGE_DTYPE):
    """{state key: TensorSpec} of everything save_quantized writes for `model` (QuantLinear layers in
    place). Works on a model built on the meta device (nominal dtypes: fp16/int16 fallbacks are
    value-dependent); on a real model the dtypes are the ones written."""
    check_storage_dtype(storage_dtype)
    qlin = qlinears(model)
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
            elif leaf in QLINEAR_LEAVES:
                spec = TensorSpec(float_storage(t, storage_dtype, leaf in _MULTIPLICATIVE), tuple(t.shape))
            else:
                raise ValueError(f"unexpected QuantLinear tensor {key}")
        elif t.is_floating_point():
            spec = TensorSpec(float_storage(t, storage_dtype), tuple(t.shape))
        else:
            spec = TensorSpec(dtype_name(t.dtype), tuple(t.shape))
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
    qlin = qlinears(model)
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
    return t.to(torch_dtype(spec.dtype))


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
            "act": None if a is None else {"bits": a.bits, "granularity": a.granularity, "scheme": a.scheme},
            **({"lora_input": m.lora_input} if m.lora_input != "quantized" else {})}  # svd_first only: as before


def layer_layout(model, plan):
    """Per-layer description recorded in quant_config.json: shapes, configs, stored dtypes."""
    out = {}
    for name, m in qlinears(model).items():
        info = layer_info(m)
        info["dtypes"] = {leaf: plan[f"{name}.{leaf}"].dtype for leaf in QLINEAR_LEAVES if f"{name}.{leaf}" in plan}
        out[name] = info
    return out
