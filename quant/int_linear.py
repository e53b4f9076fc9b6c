"""IntLinear: a quantized linear layer that runs on integer GEMMs (W8A8, packed W4A8), and to_int_backend.

The layer holds the deployable form of a `ditas`-scheme QuantLinear (integer weight codes, group
scales and zero points, LoRA factors, bias, smoothing factors) and derives from it the operands of
the kernel it runs (`kernel`):

    fused   quant/ops_avx512.py (csrc/int_linear.c): x86 CPUs with AVX512-VNNI; activation ranges and
            codes in two passes over x, then per K-group vpdpbusd accumulation with the corrections,
            scales, LoRA, bias and an optional GELU in registers: one write of the output. Weights of
            <= 4 bits stay two codes per byte there (the kernel's nibble layout is their only copy)
    torch   quant/ops_torch.py: torch._int_mm per K-group and torch ops (CUDA, other CPUs, and inputs
            whose zero points break the fused kernel's int32 bound); its docstring has the algebra
    triton  quant/ops_triton.py: CUDA GPUs (and CPU tensors under TRITON_INTERPRET=1, for tests); int8
            tl.dot per K-group, 4-bit codes kept packed and unpacked in registers, fused epilogue
    auto    triton on CUDA where triton is installed, the fused kernel on x86 CPUs that have it, else torch

Both compute the same integers as the fake-quantized QuantLinear; their float epilogues differ in
order only (~1e-7 relative). Entry points: `IntLinear.from_quantlinear`, `to_int_backend`,
`linear_w8a8`, `linear_w4a8`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from quant import ops_avx512, ops_torch
from quant.qlinear import QuantLinear
from quant.quantizer import dequantize_weight, pack_int4, unpack_int4
from quant.rotation import RotatedGELU
from quant.svd_branch import LORA_INPUTS, branch

FAKE_HINT = "use --backend fake"
# the Triton kernel's operands derived at _prepare (quant.ops_triton.Operands' w, c, cb, d), non-persistent buffers
TRITON_OPERANDS = ("t_w", "t_c", "t_cb", "t_d")
INT_KERNELS = ("auto", "torch", "fused", "triton")
ACTIVATIONS = (None, "gelu_tanh")


def _unsupported(msg):
    return ValueError(f"{msg}: no integer form, {FAKE_HINT}")


class IntLinear(nn.Module):
    """A QuantLinear prepared for integer GEMMs (see the module docstring for the algebra).

    Persistent buffers (the deployable form): `codes` uint8 (out, in) for bits > 4 or
    `codes_packed` uint8 (out, in/2) (two 4-bit codes per byte, quant.quantizer.pack_int4) for
    bits <= 4; `scale`, `zero` (out, n_groups); bias, lora_L, lora_R, smooth (all float32 whatever
    the model dtype; dtype casts of the module are ignored, outputs follow the input's dtype).
    Non-persistent operands derived from them by `_prepare` (also after load_state_dict and device
    moves), for the torch kernel: `w_op` int8 (in, out) = B, `cb_t` int32 (n_groups, out) = CB,
    `d_t` (n_groups, out) = d, `w_scale_t` (n_groups, out), `lora_Lt` (r, out), `lora_rsum` (r,);
    for the fused one instead (those stay None): `w_vnni` (B packed for vpdpbusd, 8-bit weights)
    or `w_vnni4` (the raw <= 4-bit codes, two per byte, ops_avx512.pack_b4) and the `f_*`
    per-column operands padded to 32-column blocks. A fused packed layer keeps `w_vnni4` instead of
    `codes_packed` (a permutation of the same nibbles: about 0.5 byte per weight in all); its
    state_dict still holds `codes_packed`, rebuilt from `w_vnni4` when saved. On the Triton kernel:
    `t_w` int8 (out, in) = B (8-bit weights; it replaces `codes`, rebuilt when saved; 4-bit weights use
    `codes_packed` itself), `t_c` int16, `t_cb` int32, `t_d` int32 (n_groups, out) (quant.ops_triton.Operands;
    scales, LoRA and bias are read in place). `emax`: the largest |128 - zx| whose int32 corrections cannot
    overflow (ops_torch.int32_emax), on every kernel. `kernel` and `activation`:
    see from_quantlinear. Symmetric weights are the special case zw = 2^(b-1) and are supported.
    """

    def __init__(self, codes, scale, zero, weight_cfg, act_cfg, bias=None, lora_L=None, lora_R=None,
                 smooth=None, kernel="auto", activation=None, lora_input="quantized"):
        super().__init__()
        _check_supported(weight_cfg, act_cfg)
        if lora_input not in LORA_INPUTS:
            raise ValueError(f"lora_input must be one of {LORA_INPUTS}, got {lora_input!r}")
        if lora_input == "smoothed" and activation is not None:
            raise ValueError("a branch fed x/s (lora_input 'smoothed') is added after the kernel: no fused activation")
        self.lora_input = lora_input
        if kernel not in INT_KERNELS:
            raise ValueError(f"kernel must be one of {INT_KERNELS}, got {kernel!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.kernel, self.activation = kernel, activation
        self.out_features, self.in_features = codes.shape
        n, k = codes.shape
        self.weight_cfg, self.act_cfg = weight_cfg, act_cfg
        if scale.shape != zero.shape or scale.dim() != 2 or scale.shape[0] != n or k % scale.shape[1]:
            raise _unsupported(f"weight scale/zero of shape {tuple(scale.shape)} for a {n}x{k} weight "
                               "is not a layout of groups along the input dimension")
        self.n_groups = scale.shape[1]
        self.group = k // self.n_groups
        if self.group * 128 * 128 > ops_torch.INT32_MAX:
            raise ValueError(f"group of {self.group} input columns can overflow the int32 accumulator")
        scale = scale.detach().float()
        zero = zero.detach().float()
        if not bool(torch.isfinite(zero).all()) or not torch.equal(zero, zero.round()):
            raise _unsupported("weight zero points are not integers")
        levels = 2 ** weight_cfg.bits - 1
        if codes.dtype != torch.uint8 or (codes.numel() and int(codes.max()) > levels):
            raise _unsupported(f"weight codes are not uint8 in [0, {levels}]")
        self.packed = weight_cfg.bits <= 4
        if self.packed:
            if k % 2:
                raise _unsupported(f"in_features {k} is odd, 4-bit codes cannot be packed")
            self.register_buffer("codes_packed", pack_int4(codes.contiguous()))
        else:
            self.register_buffer("codes", codes.clone())
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        lora_L = scale.new_zeros(n, 0) if lora_L is None else lora_L.detach().float().clone()
        lora_R = scale.new_zeros(0, k) if lora_R is None else lora_R.detach().float().clone()
        if lora_L.shape != (n, lora_R.shape[0]) or lora_R.shape[1] != k:
            raise ValueError(f"LoRA shapes {tuple(lora_L.shape)} x {tuple(lora_R.shape)} do not fit a {n}x{k} layer")
        # lora_input "smoothed" (svd_first): the kernels run no LoRA; branch_L, branch_R are applied to x/s in float
        smoothed = lora_input == "smoothed"
        self.register_buffer("branch_L", lora_L if smoothed else None)
        self.register_buffer("branch_R", lora_R if smoothed else None)
        self.register_buffer("lora_L", lora_L[:, :0].contiguous() if smoothed else lora_L)
        self.register_buffer("lora_R", lora_R[:0].contiguous() if smoothed else lora_R)
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float().clone())
        self._prepare()

    @torch.no_grad()
    def _prepare(self):
        """Derive the GEMM operands from the stored codes: Triton's on CUDA, the fused kernel's where it runs,
        else torch._int_mm's (which the fused layer rebuilds on the fly in the rare fallback)."""
        codes = self._codes()  # before the operands are reset: a layer may hold its codes only in them
        for name in (*ops_torch.OPERANDS, *TRITON_OPERANDS, "w_vnni", "w_vnni4", "f_sw", "f_cbd", "f_d", "f_Lt",
                     "f_Rt", "f_bias"):
            self.register_buffer(name, None, persistent=False)
        stored = self._stored_name()  # the stored form, unless a kernel's operand holds it (below)
        if self._buffers[stored] is None:
            self._buffers[stored] = pack_int4(codes) if self.packed else codes
        if self._triton_chosen(self.scale.device):
            from quant import ops_triton
            self.fused = False
            ops = ops_triton.prepare_layer(self)  # 4-bit: reads the packed codes and keeps them as they are
            for name in TRITON_OPERANDS:
                self.register_buffer(name, getattr(ops, name[2:]), persistent=False)
            self.emax = ops.emax
            if self.packed:
                self._buffers["t_w"] = None  # the operand is codes_packed itself
            else:
                self._buffers["codes"] = None  # t_w = codes - c holds them (see _codes): one copy of the weight
            return
        self.fused = self._fused_possible(self.scale.device)
        ops = ops_torch.operands(codes, self.weight_cfg.bits, self.scale, self.zero, self.lora_L, self.lora_R,
                                 weight=not (self.fused and self.packed))
        self.use_sa = bool((ops["d_t"] != 0).any())
        self.emax = ops_torch.int32_emax(ops_torch.int32_bound(ops, self.group))
        if not self.fused:
            for name in ops_torch.OPERANDS:
                self.register_buffer(name, ops[name], persistent=False)
            return
        operands, self._fbound = ops_avx512.prepare(self, codes, ops)
        for name, t in operands.items():
            self.register_buffer(name, t, persistent=False)
        if self.packed:
            self._buffers["codes_packed"] = None  # w_vnni4 holds the same nibbles (see _codes)

    @property
    def triton_ops(self):
        """quant.ops_triton.Operands over this layer's buffers (None unless it runs on the Triton kernel)."""
        if self.t_cb is None:
            return None
        from quant import ops_triton
        rank = self.lora_R.shape[0]
        return ops_triton.Operands(self.weight_cfg.bits, self.in_features, self.group,
                                   self.codes_packed if self.packed else self.t_w, self.t_c, self.t_cb, self.t_d,
                                   self.scale, self.lora_L if rank else None, self.lora_R if rank else None,
                                   self.bias, self.emax)

    def _stored_name(self):
        return "codes_packed" if self.packed else "codes"

    def _codes(self):
        """The weight codes, uint8 (out, in), from whichever form the layer holds."""
        if not self.packed:
            if self._buffers.get("codes") is not None:
                return self.codes
            return ops_torch.codes_of_b(self.t_w, ops_torch.offset_c(self.weight_cfg.bits, self.zero))
        if self._buffers.get("codes_packed") is not None:
            return unpack_int4(self.codes_packed)
        return ops_avx512.unpack_b4(self.w_vnni4, self.out_features)

    @torch.no_grad()
    def _eager_build(self):
        """The torch path's operands (quant/ops_torch.py), from the stored codes."""
        return ops_torch.operands(self._codes(), self.weight_cfg.bits, self.scale, self.zero, self.lora_L,
                                  self.lora_R)

    @property
    def runs(self):
        """The kernel this layer runs: triton, fused or torch."""
        return "triton" if self.t_cb is not None else "fused" if self.fused else "torch"

    def _eager_operands(self):
        """The torch path's operands: kept by a torch-kernel layer, rebuilt by a fused one."""
        return self._eager_build() if self.w_op is None else {name: getattr(self, name) for name in ops_torch.OPERANDS}

    def _triton_chosen(self, device):
        """Does this layer run on the Triton kernel on `device`? (kernel "triton", or "auto" on CUDA)."""
        if self.kernel not in ("triton", "auto") or (self.kernel == "auto" and device.type != "cuda"):
            return False
        from quant import ops_triton  # optional and slow to import: only where a layer may run on it
        why = None
        if not ops_triton.available():
            why = ops_triton.status()
        elif device.type != "cuda" and not ops_triton.INTERPRET:
            why = f"tensors on {device.type} (Triton runs on CUDA, or on CPU under TRITON_INTERPRET=1)"
        if why is not None and self.kernel == "triton":
            raise ValueError(f"triton integer kernel unavailable: {why}; use kernel 'fused' (x86 CPUs) or 'torch'")
        return why is None

    def _fused_possible(self, device):
        if self.kernel == "torch":
            return False
        why = None
        align = ops_avx512.ALIGN_K4 if self.packed else ops_avx512.ALIGN_K
        if device.type != "cpu":
            why = f"device {device.type}"
        elif self.in_features % align or self.group % align:
            why = (f"in_features {self.in_features} / group {self.group} not multiples of {align}"
                   + (" (packed 4-bit weights)" if self.packed else ""))
        elif ops_avx512.load() is None:
            why = ops_avx512.status()
        if why is not None and self.kernel == "fused":
            raise ValueError(f"fused integer kernel unavailable: {why}; use kernel "
                             f"{'triton' if device.type == 'cuda' else 'torch'!r}")
        return why is None

    def _fused_safe(self, zmax):
        return ops_avx512.fused_safe(self._fbound, zmax)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        name = self._stored_name()
        if self._buffers[name] is not None:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        codes = self._codes()  # rebuilt from the kernel's operand for the save only
        self._buffers[name] = pack_int4(codes) if self.packed else codes
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._buffers[name] = None

    def _load_from_state_dict(self, *args, **kwargs):
        name = self._stored_name()
        if self._buffers[name] is None:  # a target to load into (the current codes if absent)
            codes = self._codes()
            self._buffers[name] = pack_int4(codes) if self.packed else codes
        super()._load_from_state_dict(*args, **kwargs)
        self._prepare()  # the GEMM operands derive from the loaded codes/scales/LoRA

    def _apply(self, fn, recurse=True):
        # .to(device) moves buffers; dtype casts (.half(), .bfloat16(), .to(dtype)) are ignored:
        # integer operands must stay integer and scales/LoRA float32 (outputs follow x's dtype)
        device = self.scale.device
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        if self.scale.device != device:
            self._prepare()  # the operand layout depends on the device (fused kernel: CPU only)
        return self

    @classmethod
    @torch.no_grad()
    def from_quantlinear(cls, ql, kernel="auto", activation=None):
        """Prepare a QuantLinear (ditas scheme, quantized activations) for integer GEMMs.

        kernel: "auto" (Triton on CUDA, the fused CPU kernel on x86, else torch._int_mm), "torch", "fused",
        "triton" (see the module docstring); an explicit kernel that cannot run here is a ValueError.
        activation: None, or "gelu_tanh" to return GELU(tanh form) of the layer's output.
        """
        if not isinstance(ql, QuantLinear):
            raise TypeError(f"from_quantlinear expects a QuantLinear, got {type(ql).__name__}")
        _check_supported(ql.weight_cfg, ql.act_cfg)
        if ql.fake_quant_only:
            raise _unsupported("layer weight was rescaled outside its integer codes (fake_quant_only)")
        wq = dequantize_weight(ql.qweight).to(ql.weight)
        if wq.numel() and float((wq - ql.weight).abs().max()) > (
                8 * torch.finfo(ql.weight.dtype).eps * float(ql.weight.abs().max())):
            raise _unsupported("layer weight does not match its integer codes")
        return cls(ql.codes, ql.scale, ql.zero, ql.weight_cfg, ql.act_cfg, ql.bias, ql.lora_L, ql.lora_R,
                   ql.smooth, kernel=kernel, activation=activation, lora_input=ql.lora_input).to(ql.codes.device)

    def forward(self, x):
        return _int_linear(x, self)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank={self.lora_R.shape[0]}, smooth={self.smooth is not None}, "
                f"{'' if self.branch_R is None else f'branch_rank={self.branch_R.shape[0]}, '}groups={self.n_groups}x{self.group}, packed_int4={self.packed}, kernel={self.runs}, activation={self.activation}, "
                f"weight_cfg={self.weight_cfg}, act_cfg={self.act_cfg}")


def _check_supported(weight_cfg, act_cfg):
    if weight_cfg.scheme != "ditas":
        raise _unsupported(f"weight scheme {weight_cfg.scheme!r} (groups span rows of one column; "
                           "its codes no longer match after folding)")
    if act_cfg is None:
        raise _unsupported("activations are not quantized (act_cfg None)")
    if act_cfg.bits > 8:
        raise _unsupported(f"{act_cfg.bits}-bit activations")


def _int_linear(x, layer):
    """IntLinear forward: quantize x, exact integer dot products per K-group, scale, LoRA, bias.

    The fused CPU kernel where the layer prepared it (and the int32 bound holds for this input's
    activation zero points), else torch._int_mm with the epilogue in torch ops (quant/ops_torch.py).
    """
    shape = x.shape
    k, n = layer.in_features, layer.out_features
    if shape[-1] != k:
        raise ValueError(f"input has {shape[-1]} features, layer expects {k}")
    batch = ops_torch.batch_of(shape, layer.act_cfg.granularity)
    out = None
    if layer.triton_ops is not None:
        from quant import ops_triton
        cfg = layer.act_cfg
        out = ops_triton.linear(x.reshape(-1, k), layer.triton_ops, cfg.granularity, cfg.bits, cfg.scheme, batch,
                                layer.smooth, layer.activation)
    elif layer.fused and x.numel() and x.device.type == "cpu":
        out = ops_avx512.fused_linear(x.reshape(-1, k), layer, batch)
    if out is None:
        out = ops_torch.linear(x.reshape(-1, k), layer._eager_operands(), layer, batch)
        if layer.activation == "gelu_tanh":
            out = F.gelu(out, approximate="tanh")
    if layer.branch_R is not None:  # svd_first: the 16-bit branch on x/s, unquantized (quant/svd_branch.py)
        xs = x.reshape(-1, k).float()
        out = out.float() + branch(xs if layer.smooth is None else xs / layer.smooth, layer.branch_L, layer.branch_R)
    y = out.view(*shape[:-1], n)
    return y if x.dtype == y.dtype else y.to(x.dtype)


def _as_int_layer(layer):
    return layer if isinstance(layer, IntLinear) else IntLinear.from_quantlinear(layer)


def linear_w8a8(x, layer):
    """Integer forward of a layer with unpacked (5..8-bit, typically 8) weight codes.

    `layer`: an IntLinear, or a QuantLinear (prepared on the fly: slow, for one-off use).
    Per-output-channel weights (group_size None) run one int8 GEMM per row tile;
    grouped weights one per K-group.
    """
    layer = _as_int_layer(layer)
    if layer.packed:
        raise ValueError(f"{layer.weight_cfg.bits}-bit weights are packed: use linear_w4a8")
    return _int_linear(x, layer)


def linear_w4a8(x, layer):
    """Integer forward of a layer with <= 4-bit weights stored packed (two codes per byte).

    The fused CPU kernel reads the codes packed (ops_avx512.pack_b4: the layer keeps about half a
    byte per weight); the torch kernel unpacks them once into its int8 operand when the IntLinear
    is built. Either way the compute is 8-bit integer dot products per K-group.
    """
    layer = _as_int_layer(layer)
    if not layer.packed:
        raise ValueError(f"{layer.weight_cfg.bits}-bit weights are not packed: use linear_w8a8")
    return _int_linear(x, layer)


def to_int_backend(model, kernel="auto"):
    """Replace every QuantLinear in `model` (in place) by its IntLinear; returns the model.

    kernel: see IntLinear.from_quantlinear. In a DiT Mlp (fc1 -> GELU(tanh) -> fc2) the GELU moves
    into fc1's epilogue (IntLinear activation "gelu_tanh", computed in float32 before the output
    is rounded to the model's dtype) and the Mlp's act becomes Identity.
    Weight-only layers (act_cfg None, e.g. the adaLN linears of --quantize-adaln) have no integer
    activations to multiply and stay QuantLinear (their weight is dequantized once at load).
    Raises ValueError naming the layer if one has no integer form.
    """
    if isinstance(model, QuantLinear):
        return IntLinear.from_quantlinear(model, kernel)
    swaps = []
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            if isinstance(child, QuantLinear) and child.act_cfg is not None:
                # a DiT Mlp (models.py): fc1 -> act (GELU, tanh form) -> fc2
                act = getattr(mod, "act", None)
                gelu = (isinstance(act, nn.GELU) and act.approximate == "tanh") or isinstance(act, RotatedGELU)
                fuse = child_name == "fc1" and hasattr(mod, "fc2") and gelu and child.lora_input == "quantized"
                swaps.append((mod, child_name, f"{name}.{child_name}" if name else child_name, child, fuse))
    for parent, child_name, full, child, fuse in swaps:
        try:
            setattr(parent, child_name, IntLinear.from_quantlinear(child, kernel, "gelu_tanh" if fuse else None))
        except ValueError as err:
            raise ValueError(f"{full}: {err}") from None
        if fuse:  # a RotatedGELU (--hadamard) keeps its rotation
            parent.act = parent.act.rotation() if isinstance(parent.act, RotatedGELU) else nn.Identity()
    return model
