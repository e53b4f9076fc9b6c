"""The pieces every script shares: model flags, building and loading a DiT, the VAE, and
deterministic per-sample sampling.

Sample i's label and noise (x_T and every step's noise) come from a random stream keyed by
(seed, i) alone (SampleRNG), so a set of images does not depend on batch size, world size or resumption.
"""
import os

import numpy as np
import torch
import torch.distributed as dist

from cli import (MODEL_DTYPES, check_common_args, check_sampling_dtype, check_seed, default_ckpt, latent_shape,
                 set_tf32)
from quant.errors import UserError
from diffusion import create_diffusion
from download import find_model, load_model_state
from models import DiT_models
from quant.files import atomic_path
from quant.inference import kernel_lines, to_backend

VAE_SCALE = 0.18215
# images per VAE decoder call: the SD VAE decoder's float32 activations peak at about 0.28 GiB per image at
# 256 px and 1.1 GiB at 512 px (whole-batch decode at 512 px, batch 64: ~70 GiB); 4 keeps it near 4.4 GiB
VAE_DECODE_BATCH = 4


def cast_for_sampling(model, dtype, quantized, backend):
    """The sampling model in --dtype (check_sampling_dtype's rule)."""
    check_sampling_dtype(dtype, quantized, backend)
    return model if dtype == "fp32" else model.to(MODEL_DTYPES[dtype])


def sampling_model(model, args, device, quantized):
    """The model as the sampling scripts run it: --tf32 applied (cli.set_tf32), moved to `device`, a quantized
    one on --backend / --int-kernel there (quant.inference.to_backend: integer operands built once, on the
    device), cast to --dtype. Rank 0 prints which integer kernel runs, and why (one line; two for a slow
    fallback)."""
    set_tf32(args.tf32)
    if quantized:
        model = to_backend(model, args.backend, args.path, device, args.int_kernel)
        for line in kernel_lines(model, device, args.int_kernel) if rank() == 0 else ():
            print(line, flush=True)
    else:
        model = model.to(device)
    return cast_for_sampling(model, args.dtype, quantized, args.backend)


def build_model(args, load=True):
    """The DiT for --model/--image-size/--num-classes/--vae, with --ckpt loaded (eval mode). The checkpoint is
    read first: a missing or unreadable one is reported before the (for DiT-XL/2: slow, large) model is built."""
    check_common_args(args)
    channels, size = latent_shape(args)
    if load:
        ckpt = default_ckpt(args)
        state = find_model(ckpt)
    model = DiT_models[args.model](input_size=size, in_channels=channels, num_classes=args.num_classes)
    if load:
        load_model_state(model, state, ckpt)
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
def decode(vae, x, batch=VAE_DECODE_BATCH):
    """Model space -> images in [-1, 1]; the VAE decodes `batch` images per call (its memory stays bounded
    whatever the sampling batch)."""
    if vae is None:
        return x
    return torch.cat([vae.decode(part / VAE_SCALE).sample for part in x.split(batch)])


class SampleRNG:
    """The random stream of one sample: numpy's PCG64 keyed by SeedSequence(seed, spawn_key=(index,)).

    Independent streams for every (seed, index) with any 63-bit seed (torch's CPU generator keeps only
    the low 32 bits of its seed, so it cannot key on both). Draws, in order: the label (if not given),
    x_T, then every denoising step's noise.
    """

    def __init__(self, seed, index):
        if not isinstance(index, int) or index < 0:
            raise UserError(f"sample index must be a non-negative integer, got {index!r}")
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(check_seed(seed), spawn_key=(index,))))

    def randn(self, shape):
        return torch.from_numpy(self.rng.standard_normal(tuple(shape), dtype=np.float32))

    def label(self, num_classes):
        return int(self.rng.integers(num_classes))


def sample_labels(seed, n, num_classes):
    """The labels sample_inputs draws for samples 0..n-1 (to score class-conditional batches)."""
    return [SampleRNG(seed, i).label(num_classes) for i in range(n)]


def sample_inputs(seed, indices, num_classes, shape, labels=None, label_flag="--labels"):
    """Per-sample random streams (SampleRNG), labels and x_T for the given global sample indices."""
    gens = [SampleRNG(seed, int(i)) for i in indices]
    if labels is None:
        labels = [g.label(num_classes) for g in gens]
    else:
        for y in labels:
            if not 0 <= int(y) < num_classes:
                raise UserError(f"{label_flag}: label {y} outside [0, {num_classes})")
    z = torch.stack([g.randn(shape) for g in gens])
    return gens, torch.tensor([int(y) for y in labels]), z


def make_sampler(model, num_sampling_steps, cfg_scale, clip_denoised, dtype="fp32"):
    """A function (z, y, gens, progress=False) -> samples in model space, DDPM with classifier-free
    guidance; progress: a bool, or the description of the progress bar (what this loop is for).

    dtype: the model's dtype (cast_for_sampling); its input is cast to it and its output back to float32."""
    lockstep = make_lockstep_sampler(model, num_sampling_steps, cfg_scale, clip_denoised, dtype)
    return lambda z, y, gens, progress=False: lockstep([(z, y, gens)], progress)[0]


def make_lockstep_sampler(model, num_sampling_steps, cfg_scale, clip_denoised, dtype="fp32"):
    """A function (batches, progress=False) -> [samples of each batch]: make_sampler's sampling of several
    batches [(z, y, gens), ...] advanced in lockstep, every batch's step t (in order) before any step
    t - 1 (the calibration's FP loop in chunks, quant/feed.py). The progress bar counts steps."""
    diffusion = create_diffusion(str(num_sampling_steps))
    using_cfg = cfg_scale > 1.0

    def loop(z, y, gens, progress):
        device = next(model.parameters()).device
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
            eps = torch.stack([g.randn(x.shape[1:]) for g in gens]).to(x.device, x.dtype)
            return torch.cat([eps, eps], 0) if using_cfg else eps

        return diffusion.p_sample_loop_progressive(fn, z.shape, z.to(device), clip_denoised=clip_denoised,
                                                   model_kwargs=kwargs, progress=progress, device=device,
                                                   noise_fn=noise_fn)

    def sample(batches, progress=False):
        loops = [loop(z, y, gens, progress if i == 0 else False) for i, (z, y, gens) in enumerate(batches)]
        final = [None] * len(loops)
        for outs in zip(*loops):  # one step of every batch, in order
            final = list(outs)
        return [out["sample"][:len(z)] for out, (z, _, _) in zip(final, batches)]

    return sample


def _in_dtype(fn, dtype):
    def run(x, t, **kwargs):
        return fn(x.to(dtype), t, **kwargs).float()
    return run


def to_uint8(x):
    """ADM's conversion of samples in [-1, 1] to uint8 NHWC: clamp(127.5 x + 128, 0, 255), truncated."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


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
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp)


def rank():
    """This process's rank (torchrun's RANK before the process group exists)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier():
    if world_size() > 1:
        dist.barrier()


def init_distributed(device_kind):
    """Init the process group when launched by torchrun, one process included (nccl on CUDA, gloo on CPU);
    returns this process's device."""
    launched = "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ  # torchrun sets both
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
    if launched and not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return torch.device("cuda", local_rank) if device_kind == "cuda" else torch.device("cpu")


def close_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
