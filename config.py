"""QuantDiT.py's model and calibration defaults, as one dataclass. The command line wins: every field is a flag.

The released code read its bit widths from here and ignored the CLI. Here the quantization
defaults (bits, scheme, smoothing, alpha grid, LoRA, search, bias correction) live in quant/quant_config.py's
QuantConfig, the one source for Python and the command line alike; this file holds the rest.
"""
from dataclasses import dataclass

# The released code's 16 fixed ImageNet calibration labels (batch 32 after CFG doubling).
IMAGENET_CALIB_LABELS = (207, 360, 387, 974, 88, 979, 417, 279, 27, 336, 177, 594, 748, 718, 447, 613)
# The default calibration batch in samples (QuantDiT.py --calib-samples): the released 16. Larger batches raise the
# mean a little but do not remove the calibration-seed spread (docs/METHOD.md §14, bench/results/calib_spread.md).
CALIB_SAMPLES = len(IMAGENET_CALIB_LABELS)


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
    # the alpha search's state per process, GiB (quant/calibration/budget.py): DiT-XL/2's ditas search holds about
    # 6.5 GiB in one group, so 8 fits it next to the FP model and 512x512 activations on a 24 GB GPU
    calib_memory_gb: float = 8.0
    # calibration samples (labels cycled to this many); None: CALIB_SAMPLES, or --calib-labels as given
    calib_samples: int | None = None
    # the FP calibration loop's batch in equal chunks, run in turn at each step (quant/calibration/feed.py); under
    # torchrun a multiple of the processes divides the FP loops among them (CPU); 1: the whole batch
    calib_chunks: int = 1
    # preview
    cfg_scale: float = 4.0
    # float32 arithmetic on GPUs (--tf32): IEEE float32 in calibration and, by default, in sampling
    # (the checkpoint records it); docs/METHOD.md §13
    tf32: bool = False


DEFAULTS = Defaults()


def calib_labels(num_classes, n=CALIB_SAMPLES, given=None):
    """n calibration labels: `given` cycled, or the released labels for ImageNet models (cycled: each class
    again with other noise), the classes 0, 1, ... cycled otherwise."""
    base = given or (IMAGENET_CALIB_LABELS if num_classes == 1000 else range(num_classes))
    base = list(base)
    return [base[i % len(base)] for i in range(n)]


def calib_set(num_classes, labels=None, samples=None):
    """QuantDiT.py's calibration labels from its flags (None: the defaults): `samples` labels (the number given,
    or CALIB_SAMPLES) cycled from `labels` (or calib_labels' base)."""
    return calib_labels(num_classes, samples or (len(labels) if labels else CALIB_SAMPLES), labels)
