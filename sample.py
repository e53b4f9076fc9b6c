"""Sample a grid of images from a DiT into one PNG, like upstream's sample.py.

Full precision from --ckpt, or a quantized checkpoint directory from --path (folded, on the
fake or integer backend).
"""
from ditas import threads  # before torch: sets OpenMP's wait policy, read when torch loads
import torch

from ditas.cli import (ArgumentParser, UserError, add_backend_args, add_device_arg, add_dtype_arg, add_model_args,
                 add_tf32_arg, check_backend_args, check_common_args, check_positive, check_seed, check_writable,
                 pick_device, resolve_model_args, run)
from ditas.pipeline import build_model, decode, load_vae, sampling_model, save_grid
from diffusion.sampling import make_sampler, sample_inputs
from quant.method.fold import fold_smoothing
from quant.nn.inference import load_checkpoint

# upstream sample.py's defaults for the flags a quantized checkpoint may supply instead
MODEL_DEFAULTS = {"model": "DiT-XL/2", "image_size": 256, "num_classes": 1000, "vae": "mse"}
IMAGENET_SAMPLE_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


def main(args):
    threads.set_threads(args.threads)
    torch.set_grad_enabled(False)
    check_backend_args(args)
    check_seed(args.seed)
    check_writable(args.out, "--out")
    check_positive(args.nrow, "--nrow")
    check_positive(args.upscale, "--upscale")
    device = pick_device(args.device)
    meta = resolve_model_args(args, MODEL_DEFAULTS)
    check_common_args(args)
    labels = args.labels or (IMAGENET_SAMPLE_LABELS if args.num_classes == 1000
                             else list(range(min(8, args.num_classes))))
    for y in labels:
        if not 0 <= y < args.num_classes:
            raise UserError(f"--labels: label {y} outside [0, {args.num_classes}) (--num-classes {args.num_classes})")
    vae = load_vae(args.vae, device)  # before the model: a missing VAE is found first
    if meta is None:
        model = build_model(args)
    else:
        model, _ = load_checkpoint(args.path)
        fold_smoothing(model)  # smoothing factors into adaLN's shift/scale and the V rows; fc2's on the fly
    model = sampling_model(model, args, torch.device(device), meta is not None)
    channels, size = model.in_channels, model.x_embedder.img_size
    gens, y, z = sample_inputs(args.seed, range(len(labels)), args.num_classes, (channels, size, size), labels)
    sample = make_sampler(model, args.num_sampling_steps, args.cfg_scale, clip_denoised=args.vae == "none",
                          dtype=args.dtype)
    images = decode(vae, sample(z, y, gens, progress=f"sampling {len(labels)} images"))
    save_grid(images, args.out, nrow=args.nrow, upscale=args.upscale)
    print(f"saved {len(labels)} samples to {args.out}")


def build_parser():
    parser = ArgumentParser(description=__doc__)
    add_model_args(parser, **MODEL_DEFAULTS, from_path=True)
    parser.add_argument("--path", type=str, default=None, help="a quantized checkpoint directory (QuantDiT.py)")
    add_dtype_arg(parser)
    add_backend_args(parser)
    add_tf32_arg(parser, from_path=True)
    parser.add_argument("--weight-bit", type=int, default=None, help="optional check against the checkpoint")
    parser.add_argument("--act-bit", type=int, default=None, help="optional check against the checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (any integer in [0, 2^63 - 1])")
    parser.add_argument("--labels", type=int, nargs="+", default=None,
                        help="class labels, one sample each (default: 8 ImageNet classes for 1000-class models, "
                             "else classes 0..7)")
    parser.add_argument("--out", type=str, default="sample.png", help="the PNG grid to write")
    parser.add_argument("--nrow", type=int, default=4, help="images per row of the grid")
    parser.add_argument("--upscale", type=int, default=1, help="nearest-neighbour upscaling of each image")
    add_device_arg(parser)
    threads.add_threads_arg(parser)
    return parser


if __name__ == "__main__":
    run(main, build_parser().parse_args())
