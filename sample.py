"""Sample a grid of images from a DiT (full precision) into one PNG, like upstream's sample.py."""
import torch

from cli import ArgumentParser, UserError, run
from pipeline import add_model_args, build_model, decode, load_vae, make_sampler, sample_inputs, save_grid


def main(args):
    torch.set_grad_enabled(False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args)
    labels = args.labels
    if not labels:
        raise UserError("--labels needs at least one class label")
    vae = load_vae(args.vae, device)
    model = model.to(device)
    channels, size = model.in_channels, model.x_embedder.img_size
    gens, y, z = sample_inputs(args.seed, range(len(labels)), args.num_classes, (channels, size, size), labels)
    sample = make_sampler(model, args.num_sampling_steps, args.cfg_scale, clip_denoised=args.vae == "none")
    images = decode(vae, sample(z, y, gens, progress=True))
    save_grid(images, args.out, nrow=args.nrow, upscale=args.upscale)
    print(f"saved {len(labels)} samples to {args.out}")


def build_parser():
    parser = ArgumentParser(description=__doc__)
    add_model_args(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels", type=int, nargs="+", default=[207, 360, 387, 974, 88, 979, 417, 279],
                        help="class labels, one sample each")
    parser.add_argument("--out", type=str, default="sample.png")
    parser.add_argument("--nrow", type=int, default=4)
    parser.add_argument("--upscale", type=int, default=1, help="nearest-neighbour upscaling of each image")
    return parser


if __name__ == "__main__":
    run(main, build_parser().parse_args())
