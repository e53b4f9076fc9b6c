"""Sample a grid of images from a DiT into one PNG, like upstream's sample.py.

Full precision from --ckpt, or a quantized checkpoint directory from --path (folded, on the
fake or integer backend).
"""
import torch

from cli import (ArgumentParser, UserError, add_dtype_arg, add_model_args, check_sampling_dtype, pick_device,
                 resolve_model_args, run)
from pipeline import build_model, cast_for_sampling, decode, load_vae, make_sampler, sample_inputs, save_grid
from quant.fold import fold_smoothing
from quant.inference import load_checkpoint, to_backend

# upstream sample.py's defaults for the flags a quantized checkpoint may supply instead
MODEL_DEFAULTS = {"model": "DiT-XL/2", "image_size": 256, "num_classes": 1000, "vae": "mse"}


def main(args):
    torch.set_grad_enabled(False)
    if not args.labels:
        raise UserError("--labels needs at least one class label")
    if args.backend == "int" and not args.path:
        raise UserError("--backend int needs a quantized checkpoint (--path); the FP model has no integer form")
    check_sampling_dtype(args.dtype, bool(args.path), args.backend)
    device = pick_device(args.device)
    meta = resolve_model_args(args, MODEL_DEFAULTS)
    if meta is None:
        model = build_model(args)
    else:
        model, _ = load_checkpoint(args.path)
        fold_smoothing(model)  # smoothing factors into adaLN's shift/scale and the V rows; fc2's on the fly
        model = to_backend(model, args.backend, args.path)
    model = cast_for_sampling(model, args.dtype, meta is not None, args.backend)
    vae = load_vae(args.vae, device)
    model = model.to(device)
    channels, size = model.in_channels, model.x_embedder.img_size
    gens, y, z = sample_inputs(args.seed, range(len(args.labels)), args.num_classes, (channels, size, size),
                               args.labels)
    sample = make_sampler(model, args.num_sampling_steps, args.cfg_scale, clip_denoised=args.vae == "none",
                          dtype=args.dtype)
    images = decode(vae, sample(z, y, gens, progress=True))
    save_grid(images, args.out, nrow=args.nrow, upscale=args.upscale)
    print(f"saved {len(args.labels)} samples to {args.out}")


def build_parser():
    parser = ArgumentParser(description=__doc__)
    add_model_args(parser)
    # None = "not given": taken from --path's checkpoint, else upstream's defaults (MODEL_DEFAULTS)
    parser.set_defaults(model=None, image_size=None, num_classes=None, vae=None)
    parser.add_argument("--path", type=str, default=None, help="a quantized checkpoint directory (QuantDiT.py)")
    add_dtype_arg(parser)
    parser.add_argument("--backend", choices=["fake", "int"], default="fake",
                        help="with --path: fake (quantize-dequantize) or int (integer GEMMs)")
    parser.add_argument("--weight-bit", type=int, default=None, help="optional check against the checkpoint")
    parser.add_argument("--act-bit", type=int, default=None, help="optional check against the checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels", type=int, nargs="+", default=[207, 360, 387, 974, 88, 979, 417, 279],
                        help="class labels, one sample each")
    parser.add_argument("--out", type=str, default="sample.png")
    parser.add_argument("--nrow", type=int, default=4)
    parser.add_argument("--upscale", type=int, default=1, help="nearest-neighbour upscaling of each image")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser


if __name__ == "__main__":
    run(main, build_parser().parse_args())
