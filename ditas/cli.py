"""What every script shares at its edge: the common flags, their validation, and bad input as one line.

A UserError (raised here, by the scripts and by the library) is printed by `run` as one line on
stderr with exit code 2, never a traceback; argparse errors look the same.
"""
import argparse
import math
import os
import sys
import tempfile

import torch

from config import DEFAULTS
from diffusion.sampling import MODEL_DTYPES, check_seed  # noqa: F401  (check_seed: the scripts' seed check)
from download import PRETRAINED_MODELS
from models import DiT_models
from quant.errors import UserError
from quant.nn.int_linear import INT_KERNELS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default and keeps the description's layout. A default of None means
    "chosen at run time": its help text says how, and no "(default: None)" is added."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line ("error: ..."), exit 2, like every other input error; --help
    shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def run(main, args):
    """Call main(args); a UserError exits 2 with one line on stderr."""
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# Why the scripts' defaults differ (they follow upstream's scripts and the paper):
DEFAULTS_WHY = {
    "vae": "QuantDiT.py and sample.py: mse, as upstream's sample.py; sample_merge_TAS.py: ema, as upstream's "
           "sample_ddp.py (the FID setting)",
    "cfg_scale": "4.0 for pictures (sample.py, QuantDiT.py's preview, as upstream's sample.py); 1.5 for FID "
                 "(sample_merge_TAS.py, the paper's setting)",
    "steps": "QuantDiT.py: 100, the paper's calibration setting; sample.py and sample_merge_TAS.py: upstream's 250",
}


def add_model_args(parser, model="DiT-XL/2", image_size=256, num_classes=1000, vae="mse", cfg_scale=4.0, steps=250,
                   from_path=False):
    """Upstream's model flags, with the script's upstream defaults (from_path: a quantized checkpoint's
    config supplies --model/--image-size/--num-classes/--vae when not given)."""
    def given(default):
        return f" (default: from --path's checkpoint, else {default})" if from_path else ""

    parser.add_argument("--model", type=str, default=None if from_path else model,
                        help=f"DiT variant, one of {', '.join(DiT_models)}" + given(model))
    parser.add_argument("--image-size", type=int, default=None if from_path else image_size,
                        help="image resolution in pixels (a VAE model works at 1/8 of it)" + given(image_size))
    parser.add_argument("--num-classes", type=int, default=None if from_path else num_classes,
                        help="class-conditional classes (ImageNet: 1000)" + given(num_classes))
    parser.add_argument("--vae", type=str, default=None if from_path else vae,
                        help="ema | mse (stabilityai/sd-vae-ft-*), a local diffusers folder, or none (pixel space); "
                             + DEFAULTS_WHY["vae"] + given(vae))
    parser.add_argument("--cfg-scale", type=float, default=cfg_scale,
                        help="classifier-free guidance scale (1 disables it); " + DEFAULTS_WHY["cfg_scale"])
    parser.add_argument("--num-sampling-steps", type=int, default=steps,
                        help="DDPM steps (respaced from 1000); " + DEFAULTS_WHY["steps"])
    parser.add_argument("--ckpt", type=str, default=None,
                        help="DiT checkpoint: .pt / .safetensors / diffusers folder "
                             "(default: the upstream DiT-XL/2 checkpoint for --image-size)")


def add_dtype_arg(parser):
    parser.add_argument("--dtype", choices=tuple(MODEL_DTYPES), default="fp32",
                        help="dtype the model runs in while sampling (the diffusion arithmetic stays float32); "
                             "bf16: FP models, or quantized ones with --backend int")


def check_sampling_dtype(dtype, quantized, backend):
    """bf16 suits FP models and the int backend (integer layers keep their codes and float32 scales,
    accumulate exactly and return bf16); fake-quantized layers would run their own quantizer in bf16."""
    if dtype != "fp32" and quantized and backend != "int":
        raise UserError(f"--dtype {dtype} with a quantized checkpoint needs --backend int (fake quantization "
                        f"would round its own quantizer arithmetic to {dtype}); or use --dtype fp32")


def add_backend_args(parser):
    """--backend and --int-kernel (sample.py, sample_merge_TAS.py)."""
    parser.add_argument("--backend", choices=["fake", "int"], default="fake",
                        help="with --path: fake (quantize-dequantize in float, what calibration measured) or int "
                             "(integer GEMMs: Triton on CUDA, the fused AVX512-VNNI kernel on x86 CPUs, else "
                             "torch._int_mm)")
    parser.add_argument("--int-kernel", choices=INT_KERNELS, default="auto",
                        help="--backend int: the kernel every integer layer runs (auto: triton on CUDA, fused on "
                             "CPUs with AVX512-VNNI, else torch); one that cannot run here is an error")


def check_backend_args(args):
    """--backend int needs a quantized checkpoint, --int-kernel needs --backend int; --dtype: check_sampling_dtype."""
    if args.backend == "int" and not args.path:
        raise UserError("--backend int needs a quantized checkpoint (--path); the FP model has no integer form")
    if args.int_kernel != "auto" and args.backend != "int":
        raise UserError(f"--int-kernel {args.int_kernel} applies to --backend int only")
    check_sampling_dtype(args.dtype, bool(args.path), args.backend)


def add_tf32_arg(parser, from_path=False):
    """--tf32 / --no-tf32: the float32 arithmetic of every matmul and convolution on the GPU (set_tf32)."""
    default = f"the checkpoint's calibration setting (--path), else {'on' if DEFAULTS.tf32 else 'off'}"
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None if from_path else DEFAULTS.tf32,
                        help="TF32 tensor cores for float32 matmuls and convolutions on Ampere+ GPUs (no effect on "
                             "CPUs); off: IEEE float32. Calibration and sampling use the same setting by default, "
                             "recorded in the checkpoint" + (f" (default: {default})" if from_path else ""))


def set_tf32(enabled):
    """The process's float32 arithmetic on CUDA: TF32 for matmuls (cuBLAS) and convolutions (cuDNN), or IEEE
    float32 for both. Both are set either way: torch's own defaults differ (matmuls IEEE, convolutions TF32)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def add_device_arg(parser):
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (auto: cuda when a GPU is visible, else cpu)")


def check_writable(path, flag, kind="file"):
    """Fail before any work when `path`, a file or a directory (kind) to be written, cannot be: an existing
    path must be of that kind, and the directory it goes in (or the nearest existing one above it, where
    it is to be made) must take a new entry. That is tried, not inferred from permission bits (root passes
    those everywhere, /proc and read-only mounts still refuse): a probe directory is made and removed at
    once. Leaves nothing behind."""
    path = os.path.abspath(path)
    if os.path.exists(path) and os.path.isdir(path) != (kind == "dir"):
        raise UserError(f"{flag} {path} exists and is {'not ' if kind == 'dir' else ''}a directory")
    parent = path if kind == "dir" and os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path} is not writable ({parent} is not a directory)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".writable-", dir=parent))
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable (no new entry in {parent}: {e.strerror})") from None


def check_positive(value, flag):
    """A count or size a user typed (--nrow, --upscale, --batch-size, ...): an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{flag} must be a positive integer, got {value!r}")
    return value


def pick_device(spec):
    """auto | cpu | cuda -> the device kind; cuda without a GPU is a one-line error."""
    if spec == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is available (use --device cpu or auto)")
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def read_quant_config(path):
    """quant_config.json of a quantized checkpoint dir (quant.io.checkpoint.read_meta: one-line error otherwise)."""
    from quant.io.checkpoint import read_meta
    meta = read_meta(path)
    missing = [k for k in ("vae", "scheme", "weight_bit", "act_bit") if k not in meta]
    if missing:
        raise UserError(f"{path}: its quant_config.json lacks {', '.join(missing)}")
    return meta


def resolve_model_args(args, defaults):
    """Fill --model/--image-size/--num-classes/--vae from the checkpoint (--path) or `defaults`.

    Flags given explicitly must agree with a quantized checkpoint. --tf32, when not given, takes the
    checkpoint's calibration setting (else config.DEFAULTS'). Returns the checkpoint's config (or None).
    """
    meta = _resolve_from_checkpoint(args, defaults)
    if getattr(args, "tf32", False) is None:
        args.tf32 = bool((meta or {}).get("tf32", DEFAULTS.tf32))
    return meta


def _resolve_from_checkpoint(args, defaults):
    if args.path is None:
        for flag in ("act_bit", "weight_bit"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')} only applies to a quantized checkpoint (--path)")
        for key, default in defaults.items():
            if getattr(args, key) is None:
                setattr(args, key, default)
        return None
    if args.ckpt is not None:
        raise UserError("--ckpt and --path exclude each other (a quantized checkpoint directory is self-contained)")
    meta = read_quant_config(args.path)
    for key in ("model", "image_size", "num_classes"):
        given, stored = getattr(args, key), meta[key]
        if given is None:
            setattr(args, key, stored)
        elif given != stored:
            raise UserError(f"--{key.replace('_', '-')} {given} does not match the checkpoint {args.path}, "
                            f"made for {key.replace('_', '-')} {stored}")
    if args.vae is None:
        args.vae = meta["vae"]
    elif (args.vae == "none") != (meta["vae"] == "none"):
        raise UserError(f"--vae {args.vae} does not match the checkpoint {args.path}, made for vae {meta['vae']}")
    for flag, key in (("act_bit", "act_bit"), ("weight_bit", "weight_bit")):
        given = getattr(args, flag)
        if given is not None and given != meta[key]:
            raise UserError(f"--{flag.replace('_', '-')} {given} does not match the checkpoint's {key} "
                            f"{meta[key]} ({args.path})")
    return meta


def latent_shape(args):
    """(channels, size) of the space the DiT works in; validates --image-size against --vae."""
    if args.model not in DiT_models:
        raise UserError(f"unknown model {args.model!r}; choose one of {', '.join(DiT_models)}")
    if args.image_size <= 0:
        raise UserError(f"--image-size must be positive, got {args.image_size}")
    if args.vae == "none":
        channels, size = 3, args.image_size
    else:
        if args.image_size % 8:
            raise UserError(f"--image-size {args.image_size} is not a multiple of 8 (the VAE downsamples by 8)")
        channels, size = 4, args.image_size // 8
    patch = int(args.model.rsplit("/", 1)[1])
    if size % patch:
        raise UserError(f"{args.model} needs a {'latent' if args.vae != 'none' else 'image'} size divisible by "
                        f"its patch size {patch}; --image-size {args.image_size} gives {size}")
    return channels, size


def check_common_args(args):
    if args.num_classes <= 0:
        raise UserError(f"--num-classes must be positive, got {args.num_classes}")
    if not 2 <= args.num_sampling_steps <= 1000:  # one respaced step has no posterior variance to clip (upstream's too)
        raise UserError(f"--num-sampling-steps must be in 2..1000, got {args.num_sampling_steps}")
    if not 1.0 <= args.cfg_scale < math.inf:
        raise UserError(f"--cfg-scale must be a finite number >= 1 (1 disables guidance), got {args.cfg_scale}")


def default_ckpt(args):
    if args.ckpt:
        return args.ckpt
    name = f"DiT-XL-2-{args.image_size}x{args.image_size}.pt"
    if args.model != "DiT-XL/2" or name not in PRETRAINED_MODELS:
        raise UserError(f"no pretrained checkpoint for {args.model} at {args.image_size}px: pass --ckpt")
    return name
