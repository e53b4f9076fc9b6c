"""IntLinear: a quantized linear layer that runs on integer GEMMs (W8A8, packed W4A8), and to_int_backend.

The layer holds the deployable form of a `ditas`-scheme QuantLinear (integer weight codes, group
scales and zero points, LoRA factors, bias, smoothing factors) and one kernel backend
(quant/nn/backends.py), chosen when the layer is prepared for its device, that derives its operands from them:

    torch   TorchKernel: quant/kernels/ops_torch.py, torch._int_mm per K-group and torch ops (CUDA, other CPUs,
            and inputs whose zero points break the fused kernel's int32 bound); its docstring has the algebra
    fused   FusedKernel: quant/kernels/ops_avx512.py (C source quant/kernels/csrc/int_linear.c), x86 CPUs with
            AVX512-VNNI; activation ranges and codes in two passes over x, then per K-group vpdpbusd accumulation
            with the corrections, scales, LoRA, bias and an optional GELU in registers: one write of the output.
            Weights of <= 4 bits stay two codes per byte (the kernel's nibble layout is their only copy)
    triton  TritonKernel: quant/kernels/ops_triton.py (kernels in quant/kernels/triton_kernels.py), CUDA GPUs (and
            CPU tensors under TRITON_INTERPRET=1, for tests); int8 tl.dot per K-group, 4-bit codes kept packed and
            unpacked in registers, fused epilogue
    auto    triton on CUDA where triton is installed, the fused kernel on x86 CPUs that have it, else torch

All compute the same integers as the fake-quantized QuantLinear; their float epilogues differ in
order only (~1e-7 relative). Entry points: `IntLinear.from_quantlinear`, `to_int_backend`,
`linear_w8a8`, `linear_w4a8`.
"""
import torch
import torch.nn as nn

from quant.kernels import ops_torch
from quant.nn import backends
from quant.nn.qlinear import QuantLinear
from quant.method.quantizer import dequantize_weight, pack_int4, unpack_int4
from quant.method.rotation import RotatedGELU
from quant.method.svd_branch import branch
from quant.quant_config import LORA_INPUTS

FAKE_HINT = "use --backend fake"
INT_KERNELS = ("auto", *backends.KERNELS)
ACTIVATIONS = (None, "gelu_tanh")


def _unsupported(msg):
    return ValueError(f"{msg}: no integer form, {FAKE_HINT}")


class IntLinear(nn.Module):
    """A QuantLinear prepared for integer GEMMs (see the module docstring for the algebra).

    Persistent buffers (the deployable form): `codes` uint8 (out, in) for bits > 4 or
    `codes_packed` uint8 (out, in/2) (two 4-bit codes per byte, quant.method.quantizer.pack_int4) for
    bits <= 4; `scale`, `zero` (out, n_groups); bias, lora_L, lora_R, smooth (all float32 whatever
    the model dtype; dtype casts of the module are ignored, outputs follow the input's dtype).
    `backend` (quant/nn/backends.py) is the kernel it runs (`kernel`: see from_quantlinear), chosen by `_prepare`
    (also after load_state_dict and device moves) for the buffers' device; its operands are non-persistent buffers
    (backends.OPERANDS, None where another kernel runs): the torch kernel's `w_op` int8 (in, out) = B, `cb_t` int32
    (n_groups, out) = CB, `d_t` (n_groups, out) = d, `w_scale_t` (n_groups, out), `lora_Lt` (r, out), `lora_rsum`
    (r,), `excess_v` (out,); the fused one's `w_vnni` (B packed for vpdpbusd, 8-bit weights) or `w_vnni4` (the raw
    <= 4-bit codes, two per byte, ops_avx512.pack_b4) and the `f_*` per-column operands padded to 32-column blocks;
    Triton's `t_w` int8 (out, in) = B (8-bit weights; 4-bit weights use `codes_packed` itself), `t_c` int16, `t_cb`
    int32, `t_d` int32 (n_groups, out) (quant.kernels.ops_triton.Operands; scales, LoRA and bias are read in place).
    Where a kernel's operand holds the codes (fused 4-bit: w_vnni4, Triton 8-bit: t_w) the stored buffer is None,
    rebuilt for state_dict; the state_dict is the same on every kernel. Symmetric weights are the special case
    zw = 2^(b-1) and are supported.
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
        if self.packed and k % 2:
            raise _unsupported(f"in_features {k} is odd, 4-bit codes cannot be packed")
        self.register_buffer(self._stored_name(), pack_int4(codes.contiguous()) if self.packed else codes.clone())
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
        """Choose the backend for the buffers' device (backends.choose) and keep its operands as non-persistent
        buffers; the stored codes go where the backend's operand holds them."""
        codes = self.weight_codes()  # before the operands are reset: a layer may hold its codes only in them
        for name in backends.OPERANDS:
            self.register_buffer(name, None, persistent=False)
        stored = self._stored_name()
        if self._buffers[stored] is None:
            self._buffers[stored] = self._stored_form(codes)
        self.backend = backends.choose(self.kernel, self, self.scale.device)
        for name, t in self.backend.prepare(self, codes).items():
            self.register_buffer(name, t, persistent=False)
        if self.backend.holds_codes(self):
            self._buffers[stored] = None  # one copy of the weight: rebuilt from the operand when needed (weight_codes)

    @property
    def runs(self):
        """The kernel this layer runs: triton, fused or torch."""
        return self.backend.name

    @property
    def fused(self):
        """Does this layer run on the fused AVX512 kernel?"""
        return self.runs == "fused"

    @property
    def emax(self):
        """The largest |128 - zx| whose int32 corrections cannot overflow (ops_torch.int32_emax), on every kernel."""
        return self.backend.emax

    @property
    def triton_ops(self):
        """quant.kernels.ops_triton.Operands over this layer's buffers (None unless it runs on the Triton kernel)."""
        return self.backend.operands(self) if self.runs == "triton" else None

    def _fused_safe(self, zmax):
        """A fused layer's FusedKernel.safe: do its int32 partials fit for activation zero points up to zmax?"""
        return self.backend.safe(zmax)

    def _eager_operands(self):
        """The torch path's operands: kept by a torch-kernel layer, rebuilt by the others."""
        return self.backend.operands(self) if self.runs == "torch" else backends.torch_operands(self)

    def _stored_name(self):
        return "codes_packed" if self.packed else "codes"

    def _stored_form(self, codes):
        return pack_int4(codes) if self.packed else codes

    def weight_codes(self):
        """The weight codes, uint8 (out, in), from whichever form the layer holds."""
        stored = self._buffers.get(self._stored_name())
        if stored is None:
            return self.backend.codes(self)
        return unpack_int4(stored) if self.packed else stored

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        name = self._stored_name()
        if self._buffers[name] is not None:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        self._buffers[name] = self._stored_form(self.weight_codes())  # from the kernel's operand, for the save only
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._buffers[name] = None

    def _load_from_state_dict(self, *args, **kwargs):
        name = self._stored_name()
        if self._buffers[name] is None:  # a target to load into (the current codes if absent)
            self._buffers[name] = self._stored_form(self.weight_codes())
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
                f"{'' if self.branch_R is None else f'branch_rank={self.branch_R.shape[0]}, '}"
                f"groups={self.n_groups}x{self.group}, packed_int4={self.packed}, kernel={self.runs}, "
                f"activation={self.activation}, "
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
    """IntLinear forward: quantize x, exact integer dot products per K-group, scale, LoRA, bias, on the layer's
    backend (quant/nn/backends.py); the output in x's dtype."""
    shape = x.shape
    k, n = layer.in_features, layer.out_features
    if shape[-1] != k:
        raise ValueError(f"input has {shape[-1]} features, layer expects {k}")
    batch = ops_torch.batch_of(shape, layer.act_cfg.granularity)
    out = layer.backend.linear(layer, x.reshape(-1, k), batch)
    if layer.branch_R is not None:  # svd_first: the 16-bit branch on x/s, unquantized (quant/method/svd_branch.py)
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
