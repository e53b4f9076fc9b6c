"""Hadamard rotation of the inputs of attn.proj and mlp.fc2 (beyond the paper, `--hadamard`; QuaRot-style).

H_b is the normalized Walsh-Hadamard matrix of size b (Sylvester order: H_1 = [1], H_2k = [[H_k, H_k],
[H_k, -H_k]] / sqrt(2)); symmetric and orthogonal, H_b H_b = I. A layer's input is rotated by the
block-diagonal H = diag(H_b, ..., H_b), b the largest power of two dividing the width, at most MAX_BLOCK
(128, the weight group size), and its weight by the same H, so that (x H)(W H)^T = x W^T: in full
precision the model computes the same function. Rotated, an outlier channel is spread over the b
channels of its block, which is what 4-bit activation ranges need.

    proj   its input is softmax(QK^T) V, linear in V; with b dividing the head dim, every block lies in
           one head, so (A V_h) H_b = A (V_h H_b): qkv's V rows become H W_v (and H b_v), proj's weight
           W_p H. Folded: no run-time cost. DiT-XL/2's heads of 72 give b = 8; the bundled model's 64, b = 64.
    fc2    its input is GELU(fc1(.)), which nothing linear precedes: mlp.act becomes RotatedGELU (GELU, then
           H online) and fc2's weight W H. DiT-XL/2: 4608 = 36 x 128, b = 128. The online H is one batched
           product with the dense b x b block (`block_rotate`: b multiply-adds per element, one pass over x),
           not the fast transform's log2(b) butterfly stages (`fwht`: n log2(b) additions per token, but one
           pass over x per stage in torch ops): at 512 x 4608 on one CPU core the product took about half
           the W4A8 fc2 call, the butterfly 2.5x the product (bench/studies/hadamard_cost.py, bench/results/w4a4.md).

`rotate_dit` applies this to the FP model before calibration, so smoothing acts on the rotated channels
(x -> (x H) / s, W -> W H diag(s): rotate, then smooth) and every later step -- the TAS statistics, the alpha
search, the LoRA fits, folding s, the integer backend, the checkpoint -- sees an ordinary linear layer: the
search scores exactly the layer it builds. The checkpoint records `hadamard`; loading puts RotatedGELU back.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_BLOCK = 128


def block_size(n, cap=MAX_BLOCK):
    """The largest power of two dividing n, at most cap."""
    if n < 1:
        raise ValueError(f"a width must be positive, got {n}")
    return min(n & -n, cap)


def fwht(x, block):
    """x (..., n) times the block-diagonal normalized Hadamard matrix diag(H_b, ..., H_b), b = block (a power of
    two dividing n): log2(b) butterfly stages on x's dtype, then one scale by b^-1/2. A new tensor."""
    n = x.shape[-1]
    if block < 1 or block & (block - 1) or n % block:
        raise ValueError(f"Hadamard block {block} must be a power of two dividing the width {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < block:
        v = y.view(y.shape[0], n // (2 * h), 2, h)
        a, c = v[:, :, 0], v[:, :, 1]
        y = torch.stack((a + c, a - c), dim=2).view(-1, n)
        h *= 2
    return (y * (1.0 / math.sqrt(block))).view(*lead, n)


def hadamard_matrix(block, dtype=torch.float32, device=None):
    """The normalized Sylvester Hadamard matrix H_b (b x b), from fwht of the identity in float64."""
    return fwht(torch.eye(block, dtype=torch.float64, device=device), block).to(dtype)


def block_rotate(x, h):
    """x (..., n) times diag(h, ..., h) for a b x b block h (b dividing n): one batched product."""
    n, b = x.shape[-1], h.shape[0]
    return (x.reshape(-1, n // b, b) @ h.to(x.dtype)).view(x.shape)


class BlockHadamard(nn.Module):
    """x -> x diag(H_b, ..., H_b) (block_rotate); H_b is a non-persistent buffer (not in the state dict)."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        self.register_buffer("matrix", hadamard_matrix(block), persistent=False)

    def forward(self, x):
        return block_rotate(x, self.matrix)

    def extra_repr(self):
        return f"block={self.block}"


class RotatedGELU(BlockHadamard):
    """GELU (tanh form, DiT's) followed by the block Hadamard rotation: the act of an Mlp whose fc2 has the
    rotated weight. to_int_backend fuses the GELU into fc1 and keeps the rotation (`rotation()`)."""

    def forward(self, x):
        return block_rotate(F.gelu(x, approximate="tanh"), self.matrix)

    def rotation(self):
        return BlockHadamard(self.block)


@torch.no_grad()
def _rotate_columns(linear, block):
    """W -> W H (float64, rounded back): the layer now expects the rotated input x H."""
    w = linear.weight
    w.copy_(fwht(w.double(), block).to(w.dtype))


@torch.no_grad()
def _rotate_v_rows(qkv, block):
    """qkv's V rows W_v -> H W_v, b_v -> H b_v (H per head, block | head_dim): V comes out as V H."""
    c = qkv.in_features
    rows = slice(2 * c, 3 * c)
    w = qkv.weight
    w[rows] = fwht(w[rows].double().T, block).T.to(w.dtype)  # H W_v = (W_v^T H)^T, H symmetric
    if qkv.bias is not None:
        qkv.bias[rows] = fwht(qkv.bias[rows].double(), block).to(qkv.bias.dtype)


@torch.no_grad()
def rotate_dit(model, cap=MAX_BLOCK):
    """Rotate the inputs of every block's attn.proj (folded into qkv's V rows) and mlp.fc2 (RotatedGELU online),
    in place, on the FP model (nn.Linear layers, before quantization). Returns {layer name: block size}."""
    sizes = {}
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        if not all(isinstance(m, nn.Linear) for m in (attn.qkv, attn.proj, mlp.fc2)):
            raise ValueError("rotate_dit rotates the FP model, before its linears are quantized")
        if not isinstance(mlp.act, nn.GELU) or mlp.act.approximate != "tanh":
            raise ValueError(f"blocks.{i}.mlp.act is {mlp.act}, expected DiT's GELU(tanh) (rotated twice?)")
        b = block_size(attn.head_dim, cap)
        _rotate_v_rows(attn.qkv, b)
        _rotate_columns(attn.proj, b)
        b2 = block_size(mlp.fc2.in_features, cap)
        _rotate_columns(mlp.fc2, b2)
        mlp.act = RotatedGELU(b2)
        sizes[f"blocks.{i}.attn.proj"], sizes[f"blocks.{i}.mlp.fc2"] = b, b2
    return sizes


def rotated_skeleton(model, cap=MAX_BLOCK):
    """The online part of rotate_dit on a model built from a checkpoint (its weights already rotated): every
    block's mlp.act becomes RotatedGELU. Returns the model."""
    for block in model.blocks:
        block.mlp.act = RotatedGELU(block_size(block.mlp.fc2.in_features, cap))
    return model
