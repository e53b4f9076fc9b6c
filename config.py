"""Defaults for QuantDiT.py, as one dataclass. The command line wins: every field is a flag.

The released code read its bit widths from here and ignored the CLI; here this file only
supplies defaults.
"""
from dataclasses import dataclass

# The released code's 16 fixed ImageNet calibration labels (batch 32 after CFG doubling).
IMAGENET_CALIB_LABELS = (207, 360, 387, 974, 88, 979, 417, 279, 27, 336, 177, 594, 748, 718, 447, 613)


@dataclass(frozen=True)
class Defaults:
    # model (upstream's)
    model: str = "DiT-XL/2"
    image_size: int = 256
    num_classes: int = 1000
    vae: str = "mse"
    seed: int = 1
    # calibration: DDPM, respaced to num_sampling_steps, CFG 1.5 on a fixed noise batch
    num_sampling_steps: int = 100
    calib_cfg_scale: float = 1.5
    # quantization
    scheme: str = "ditas"              # ditas (deployable) | reference (the released code's numerics)
    weight_bit: int = 4
    act_bit: int = 8
    group_size: int = 128              # ditas: input columns per weight group; 0 = per output channel
    act_granularity_ditas: str = "row"      # per batch row: a sample never depends on its neighbours
    act_granularity_reference: str = "tensor"  # the paper / released code
    smoothing: str = "search"          # search | fixed | none
    alpha: float = 0.5                 # the fixed alpha (--smoothing fixed)
    alpha_step: float = 0.05           # grid {0, 0.05, ..., 1}
    lora_rank: int = 32
    lora_iters: int = 10
    svd: str = "full"                  # full | lowrank (randomized, faster on large layers)
    reference_search_steps: int = 50   # the released search uses the first 50 (noisiest) steps only
    # preview
    cfg_scale: float = 4.0


DEFAULTS = Defaults()


def calib_labels(num_classes):
    """The released labels for ImageNet models; 16 labels cycling over the classes otherwise."""
    if num_classes == 1000:
        return list(IMAGENET_CALIB_LABELS)
    return [i % num_classes for i in range(16)]
