"""Which layers of a DiT are quantized (docs/METHOD.md §1): the layer registry.

The four linears of every block (attention qkv and output projection, the MLP's fc1 and fc2)
carry the method; with --quantize-adaln every block's adaLN linear is also quantized,
weight-only. Names are upstream DiT's module paths (models.py), for any depth.
"""
from quant.quant_config import WeightQuantConfig

BLOCK_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
# --quantize-adaln: weight-only quantization of every block's adaLN linear (Linear(D, 6D)).
ADALN_LAYER = "adaLN_modulation.1"
ADALN_WEIGHT_CFG = WeightQuantConfig(bits=8, group_size=None, scheme="ditas")  # per output channel, RTN


def quantizable_layers(model):
    """{name: nn.Linear} of the four linears of every block, in block order (any depth)."""
    return {f"blocks.{i}.{n}": block.get_submodule(n) for i, block in enumerate(model.blocks) for n in BLOCK_LAYERS}


def adaln_layers(model):
    """{name: adaLN linear} of every block (not final_layer's: 2D x D, 0.4 % of DiT-XL/2's weights,
    and it modulates the FP output projection directly)."""
    return {f"blocks.{i}.{ADALN_LAYER}": block.get_submodule(ADALN_LAYER) for i, block in enumerate(model.blocks)}


def check_layers(layers, cfg):
    """Raise ValueError for a QuantConfig that does not fit some layer, before any work is done."""
    for name, lin in layers.items():
        out, inp = lin.weight.shape
        if cfg.scheme == "ditas" and cfg.group_size is not None and inp % cfg.group_size:
            raise ValueError(f"--group-size {cfg.group_size} does not divide the input width {inp} of {name}")
        if cfg.scheme == "reference" and out % 32:
            raise ValueError(f"the reference scheme needs output widths divisible by 32; {name} has {out}")
        if cfg.lora_rank > min(out, inp):
            raise ValueError(f"--lora-rank {cfg.lora_rank} exceeds min(in, out) = {min(out, inp)} of {name}")
