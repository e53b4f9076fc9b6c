"""The pieces every script shares: model flags, building and loading a DiT, the VAE, and
deterministic per-sample sampling.

Sample i's label and noise (x_T and every step's noise) come from a generator seeded by
(seed, i) alone, so a set of images does not depend on batch size, world size or resumption.
"""
import os

import torch

from cli import UserError
from diffusion import create_diffusion
from download import PRETRAINED_MODELS, find_model, load_model_state
from models import DiT_models

VAE_SCALE = 0.18215


def add_model_args(parser, image_size=256, num_classes=1000, vae="mse", cfg_scale=4.0, steps=250):
    """Upstream's model flags, with the script's upstream defaults."""
    parser.add_argument("--model", type=str, default="DiT-XL/2", help=f"one of {', '.join(DiT_models)}")
    parser.add_argument("--image-size", type=int, default=image_size)
    parser.add_argument("--num-classes", type=int, default=num_classes)
    parser.add_argument("--vae", type=str, default=vae,
                        help="ema | mse (stabilityai/sd-vae-ft-*), a local diffusers folder, or none (pixel space)")
    parser.add_argument("--cfg-scale", type=float, default=cfg_scale)
    parser.add_argument("--num-sampling-steps", type=int, default=steps)
    parser.add_argument("--ckpt", type=str, default=None,
                        help="DiT checkpoint: .pt / .safetensors / diffusers folder "
                             "(default: the upstream DiT-XL/2 checkpoint for --image-size)")


MODEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def cast_for_sampling(model, dtype, quantized, backend):
    """The sampling model in --dtype (check_sampling_dtype's rule)."""
    check_sampling_dtype(dtype, quantized, backend)
    return model if dtype == "fp32" else model.to(MODEL_DTYPES[dtype])


def pick_device(spec):
    """auto | cpu | cuda -> the device kind; cuda without a GPU is a one-line error."""
    if spec == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is available (use --device cpu or auto)")
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def read_quant_config(path):
    """quant_config.json of a quantized checkpoint dir (quant.checkpoint.read_meta: one-line error otherwise)."""
    from quant.checkpoint import read_meta
    meta = read_meta(path)
    missing = [k for k in ("vae", "scheme", "weight_bit", "act_bit") if k not in meta]
    if missing:
        raise UserError(f"{path}: its quant_config.json lacks {', '.join(missing)}")
    return meta


def resolve_model_args(args, defaults):
    """Fill --model/--image-size/--num-classes/--vae from the checkpoint (--path) or `defaults`.

    Flags given explicitly must agree with a quantized checkpoint. Returns its config (or None).
    """
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
    if args.num_sampling_steps <= 0 or args.num_sampling_steps > 1000:
        raise UserError(f"--num-sampling-steps must be in 1..1000, got {args.num_sampling_steps}")
    if args.cfg_scale < 1.0:
        raise UserError(f"--cfg-scale must be >= 1 (1 disables guidance), got {args.cfg_scale}")


def default_ckpt(args):
    if args.ckpt:
        return args.ckpt
    name = f"DiT-XL-2-{args.image_size}x{args.image_size}.pt"
    if args.model != "DiT-XL/2" or name not in PRETRAINED_MODELS:
        raise UserError(f"no pretrained checkpoint for {args.model} at {args.image_size}px: pass --ckpt")
    return name


def build_model(args, load=True):
    """The DiT for --model/--image-size/--num-classes/--vae, with --ckpt loaded (eval mode)."""
    check_common_args(args)
    channels, size = latent_shape(args)
    model = DiT_models[args.model](input_size=size, in_channels=channels, num_classes=args.num_classes)
    if load:
        ckpt = default_ckpt(args)
        load_model_state(model, find_model(ckpt), ckpt)
    return model.eval()


def load_vae(spec, device):
    """None for pixel models; else diffusers' AutoencoderKL (hub name or local folder).

    Offline (HF_HUB_OFFLINE, or no network) is a one-line error, not a long hang.
    """
    if spec == "none":
        return None
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise UserError("--vae needs the diffusers package (pip install diffusers); "
                        "use --vae none for pixel-space models") from None
    name = spec if os.path.isdir(spec) else f"stabilityai/sd-vae-ft-{spec}"
    if not os.path.isdir(spec) and spec not in ("ema", "mse"):
        raise UserError(f"--vae {spec!r} is neither ema, mse, none nor a local folder")
    try:
        return AutoencoderKL.from_pretrained(name, local_files_only=True).to(device).eval()
    except Exception:
        if os.path.isdir(spec) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
            raise UserError(f"cannot load VAE {name} offline: not in the Hugging Face cache; "
                            f"download it once online or pass --vae PATH to a local diffusers folder") from None
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    try:
        return AutoencoderKL.from_pretrained(name).to(device).eval()
    except Exception as e:
        raise UserError(f"cannot download VAE {name} ({type(e).__name__}); "
                        f"pass --vae PATH to a local diffusers folder") from None


@torch.no_grad()
def decode(vae, x):
    """Model space -> images in [-1, 1]."""
    if vae is None:
        return x
    return vae.decode(x / VAE_SCALE).sample


SEED_BITS, INDEX_BITS = 12, 20


def sample_seed(seed, index):
    """The generator seed of sample `index`: depends on (seed, index) only, and differs for every pair.

    torch's CPU generator seeds mt19937 with the low 32 bits only, so (seed, index) is packed into
    32 bits: 12 for the seed, 20 for the index (1,048,576 samples per seed).
    """
    seed, index = int(seed), int(index)
    if not 0 <= seed < 1 << SEED_BITS:
        raise UserError(f"seed must be in [0, {1 << SEED_BITS}), got {seed}")
    if not 0 <= index < 1 << INDEX_BITS:
        raise UserError(f"sample index {index} exceeds the {1 << INDEX_BITS} samples a seed can address")
    return (seed << INDEX_BITS) | index


def _draw_label(gen, num_classes):
    return int(torch.randint(0, num_classes, (1,), generator=gen))


def sample_labels(seed, n, num_classes):
    """The labels sample_inputs draws for samples 0..n-1 (to score class-conditional batches)."""
    return [_draw_label(torch.Generator().manual_seed(sample_seed(seed, i)), num_classes) for i in range(n)]


def sample_inputs(seed, indices, num_classes, shape, labels=None):
    """Per-sample generators, labels and x_T for the given global sample indices.

    Each generator draws the label first (if not given), then x_T, then every step's noise.
    """
    gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]
    if labels is None:
        labels = [_draw_label(g, num_classes) for g in gens]
    else:
        for y in labels:
            if not 0 <= int(y) < num_classes:
                raise UserError(f"label {y} outside [0, {num_classes})")
    z = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return gens, torch.tensor([int(y) for y in labels]), z


def make_sampler(model, num_sampling_steps, cfg_scale, clip_denoised, dtype="fp32"):
    """A function (z, y, gens) -> samples in model space, DDPM with classifier-free guidance.

    dtype: the model's dtype (cast_for_sampling); its input is cast to it and its output back to float32."""
    diffusion = create_diffusion(str(num_sampling_steps))
    using_cfg = cfg_scale > 1.0

    def sample(z, y, gens, progress=False):
        device = next(model.parameters()).device
        n = len(z)
        if using_cfg:
            z = torch.cat([z, z], 0)
            y = torch.cat([y, torch.full_like(y, model.num_classes)], 0)
            kwargs = dict(y=y.to(device), cfg_scale=cfg_scale)
            fn = model.forward_with_cfg
        else:
            kwargs = dict(y=y.to(device))
            fn = model.forward
        if dtype != "fp32":
            fn = _in_dtype(fn, MODEL_DTYPES[dtype])

        def noise_fn(x):
            eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device, x.dtype)
            return torch.cat([eps, eps], 0) if using_cfg else eps

        out = diffusion.p_sample_loop(fn, z.shape, z.to(device), clip_denoised=clip_denoised, model_kwargs=kwargs,
                                      progress=progress, device=device, noise_fn=noise_fn)
        return out[:n]

    return sample


def _in_dtype(fn, dtype):
    def run(x, t, **kwargs):
        return fn(x.to(dtype), t, **kwargs).float()
    return run


def save_grid(images, path, nrow=4, pad=2, upscale=1):
    """Save images in [-1, 1] (N, 3, H, W) as one PNG grid, like torchvision's save_image(normalize=True)."""
    from PIL import Image
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if upscale > 1:
        x = x.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = torch.zeros(c, nrows * (h + pad) + pad, ncol * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = x[i]
    tmp = path + ".tmp.png"
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp)
    os.replace(tmp, path)
