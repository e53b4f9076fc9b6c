"""The pieces every script shares: building and loading a DiT, the VAE, the sampling model's set-up, image
grids and DDP helpers. The samplers and per-sample noise are diffusion/sampling.py's."""
import os
import sys

import torch
import torch.distributed as dist

from ditas.cli import MODEL_DTYPES, check_common_args, check_sampling_dtype, default_ckpt, latent_shape, set_tf32
from quant.errors import UserError
from download import find_model, load_model_state
from models import DiT_models
from quant.io.files import atomic_path
from quant.nn.inference import kernel_lines, to_backend

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
    one on --backend / --int-kernel there (quant.nn.inference.to_backend: integer operands built once, on the
    device), cast to --dtype. Rank 0 prints which integer kernel runs, and why (one line; two for a slow
    fallback)."""
    set_tf32(args.tf32)
    if quantized:
        model = to_backend(model, args.backend, device, args.int_kernel, path=args.path)
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


def on_every_rank(main, args):
    """main(args) on this rank; an input error (UserError) stops every rank, and rank 0 alone reports it (cli.run);
    the process group is closed either way."""
    try:
        return main(args)
    except UserError:
        if rank() != 0:
            sys.exit(2)
        raise
    finally:
        close_distributed()


def close_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
