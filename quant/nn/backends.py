"""The kernels an IntLinear (quant/nn/int_linear.py) runs on: one class per kernel, chosen once per device by `choose`.

    kernel   class         wrapper (quant/kernels/)             source
    torch    TorchKernel   ops_torch.py: operands, linear       torch._int_mm and torch ops (the algebra: its docstring)
    fused    FusedKernel   ops_avx512.py: w8_operands /         csrc/int_linear.c (ditas_rowrange, ditas_encode,
                           w4_operands, fused_linear            ditas_qgemm / ditas_qgemm_w4), built by avx512_build.py
    triton   TritonKernel  ops_triton.py: prepare_layer,        triton_kernels.py (act_range_kernel, act_encode_kernel,
                           Operands, linear                     int_gemm_kernel)

Each instance belongs to one layer: `prepare(layer, codes)` returns its operands {name: tensor} (the layer keeps them
as non-persistent buffers named in `buffers`, so that they move with it) and keeps the scalars it derives (the int32
bound `emax`, ...); `linear(layer, x2, batch)` is the layer's forward on (M, K) rows. `holds_codes(layer)`: the kernel's
operand is the layer's only copy of the weight codes (the stored buffer is dropped; `codes(layer)` rebuilds them).
"""
import torch.nn.functional as F

from quant.kernels import ops_avx512, ops_torch


def torch_scalars(ops, group):
    """(emax, use_sa) of the torch path's operands: ops_torch.int32_emax of their bound, and whether any d != 0."""
    return ops_torch.int32_emax(ops_torch.int32_bound(ops, group)), bool((ops["d_t"] != 0).any())


def torch_operands(layer):
    """The torch path's operands of a layer (ops_torch.operands), from its stored codes."""
    return ops_torch.operands(layer.weight_codes(), layer.weight_cfg.bits, layer.scale, layer.zero, layer.lora_L,
                              layer.lora_R)


def torch_linear(layer, x2, batch, ops, emax, use_sa):
    """ops_torch.linear on (M, K) rows, then the layer's activation (float32 (M, N))."""
    out = ops_torch.linear(x2, ops, layer, batch, emax, use_sa)
    return F.gelu(out, approximate="tanh") if layer.activation == "gelu_tanh" else out


class TorchKernel:
    """torch._int_mm per K-group and torch ops (quant/kernels/ops_torch.py): CUDA, other CPUs, and every layout."""
    name = "torch"
    buffers = ops_torch.OPERANDS

    @staticmethod
    def unavailable(layer, device):
        return None

    def prepare(self, layer, codes):
        ops = ops_torch.operands(codes, layer.weight_cfg.bits, layer.scale, layer.zero, layer.lora_L, layer.lora_R)
        self.emax, self.use_sa = torch_scalars(ops, layer.group)
        return ops

    def holds_codes(self, layer):
        return False

    def operands(self, layer):
        """The torch path's operands, as the layer holds them."""
        return {name: getattr(layer, name) for name in self.buffers}

    def linear(self, layer, x2, batch):
        return torch_linear(layer, x2, batch, self.operands(layer), self.emax, self.use_sa)


class FusedKernel:
    """The fused AVX512-VNNI linear (quant/kernels/ops_avx512.py: fused_linear; C source
    quant/kernels/csrc/int_linear.c) on x86 CPUs: two passes over x (ranges, codes), then per K-group vpdpbusd with
    the corrections, scales, LoRA, bias and GELU in registers. Weights of <= 4 bits stay two codes per byte (w_vnni4,
    their only copy). Inputs whose activation zero points break its int32 bound run the torch path instead (its
    operands rebuilt for the call)."""
    name = "fused"
    buffers = ("w_vnni", "w_vnni4", "f_sw", "f_cbd", "f_d", "f_Lt", "f_Rt", "f_bias")

    @staticmethod
    def unavailable(layer, device):
        align = ops_avx512.ALIGN_K4 if layer.packed else ops_avx512.ALIGN_K
        if device.type != "cpu":
            return f"device {device.type}"
        if layer.in_features % align or layer.group % align:
            return (f"in_features {layer.in_features} / group {layer.group} not multiples of {align}"
                    + (" (packed 4-bit weights)" if layer.packed else ""))
        return None if ops_avx512.load() is not None else ops_avx512.status()

    @staticmethod
    def hint(device):
        return f"use kernel {'triton' if device.type == 'cuda' else 'torch'!r}"

    def prepare(self, layer, codes):
        ops = ops_torch.operands(codes, layer.weight_cfg.bits, layer.scale, layer.zero, layer.lora_L, layer.lora_R,
                                 weight=not layer.packed)
        self.emax, self.use_sa = torch_scalars(ops, layer.group)
        if layer.packed:
            out, self.bound = ops_avx512.w4_operands(codes, layer.scale, layer.zero, layer.lora_L, layer.lora_R,
                                                     layer.bias)
        else:
            out, self.bound = ops_avx512.w8_operands(ops["w_op"], ops["cb_t"], ops["d_t"], layer.scale, layer.lora_L,
                                                     layer.lora_R, layer.bias)
        return out

    def holds_codes(self, layer):
        return layer.packed  # w_vnni4 is a permutation of codes_packed's nibbles

    def codes(self, layer):
        return ops_avx512.unpack_b4(layer.w_vnni4, layer.out_features)

    def safe(self, zx_max):
        """Do the int32 partials fit for activation zero points up to zx_max in magnitude?"""
        return ops_avx512.fused_safe(self.bound, zx_max)

    def linear(self, layer, x2, batch):
        out = None
        if x2.numel() and x2.device.type == "cpu":
            ops = {name: getattr(layer, name) for name in self.buffers}
            out = ops_avx512.fused_linear(x2, ops, layer, batch, self.bound)
        return torch_linear(layer, x2, batch, torch_operands(layer), self.emax, self.use_sa) if out is None else out


class TritonKernel:
    """The Triton kernels (quant/kernels/ops_triton.py: linear; sources quant/kernels/triton_kernels.py) on CUDA GPUs,
    and on CPU tensors under TRITON_INTERPRET=1 (tests): int8 tl.dot per K-group, 4-bit codes kept packed (the
    operand is codes_packed itself) and unpacked in registers, fused epilogue. 8-bit weights keep B = codes - c (t_w)
    in place of the codes; scales, LoRA and bias are read in place."""
    name = "triton"
    buffers = ("t_w", "t_c", "t_cb", "t_d")

    @staticmethod
    def unavailable(layer, device):
        from quant.kernels import ops_triton  # optional and slow to import: only where a layer may run on it
        if not ops_triton.available():
            return ops_triton.status()
        if device.type != "cuda" and not ops_triton.INTERPRET:
            return f"tensors on {device.type} (Triton runs on CUDA, or on CPU under TRITON_INTERPRET=1)"
        return None

    @staticmethod
    def hint(device):
        return "use kernel 'fused' (x86 CPUs) or 'torch'"

    def prepare(self, layer, codes):
        from quant.kernels import ops_triton
        ops = ops_triton.prepare_layer(layer)  # 4-bit: reads the packed codes and keeps them as they are
        self.emax = ops.emax
        return {"t_w": None if layer.packed else ops.w, "t_c": ops.c, "t_cb": ops.cb, "t_d": ops.d}

    def holds_codes(self, layer):
        return not layer.packed  # t_w = codes - c

    def codes(self, layer):
        return ops_torch.codes_of_b(layer.t_w, ops_torch.offset_c(layer.weight_cfg.bits, layer.zero))

    def operands(self, layer):
        """quant.kernels.ops_triton.Operands over the layer's buffers."""
        from quant.kernels import ops_triton
        rank = layer.lora_R.shape[0]
        return ops_triton.Operands(layer.weight_cfg.bits, layer.in_features, layer.group,
                                   layer.codes_packed if layer.packed else layer.t_w, layer.t_c, layer.t_cb,
                                   layer.t_d, layer.scale, layer.lora_L if rank else None,
                                   layer.lora_R if rank else None, layer.bias, self.emax)

    def linear(self, layer, x2, batch):
        from quant.kernels import ops_triton
        cfg = layer.act_cfg
        return ops_triton.linear(x2, self.operands(layer), cfg.granularity, cfg.bits, cfg.scheme, batch, layer.smooth,
                                 layer.activation)


KERNELS = {"torch": TorchKernel, "fused": FusedKernel, "triton": TritonKernel}
OPERANDS = tuple(name for cls in KERNELS.values() for name in cls.buffers)


def choose(kernel, layer, device):
    """A new instance of the kernel a layer runs on `device`: `kernel` itself, or for "auto" Triton on CUDA, else the
    fused kernel, where they can run, else torch ops. An explicit kernel that cannot run there is a ValueError naming
    why and the alternative."""
    if kernel != "auto":
        cls = KERNELS[kernel]
        why = cls.unavailable(layer, device)
        if why is not None:
            raise ValueError(f"{kernel} integer kernel unavailable: {why}; {cls.hint(device)}")
        return cls()
    tries = (TritonKernel, FusedKernel) if device.type == "cuda" else (FusedKernel,)
    return next((cls() for cls in tries if cls.unavailable(layer, device) is None), TorchKernel())
