"""Pictures for the quality study: samples per method, and per-layer alpha / error plots.

    python bench/pictures.py [--steps 20 --bits W4A8 W8A8 --schemes ditas reference]

bench/results/methods.png   one row per method (FP on top), one column per noise + label: every
                            column is the same x_T, step noise and label (labels 0..9) in every row.
bench/results/layers.png    per layer (x: blocks.N.{qkv,proj,fc1,fc2}), for each bit width and scheme:
                            the chosen alpha (searched without LoRA, and with LoRA), and the search
                            loss (mean squared output error per step on the FP calibration inputs)
                            before smoothing (round-to-nearest: the full run's output_error_rtn),
                            after smoothing (the --lora-rank 0 run's output_error) and after LoRA
                            (the full run's output_error). Needs matplotlib (optional).

The quantized checkpoints are quality.py's (same cache under results/bench/ckpt, made here if
missing), so pass the same --steps / --calib-steps / --ckpt as the quality run.
"""
import argparse
import json
import os
import shlex
import sys

from ditas import threads  # first: sets OpenMP's wait policy, read when torch loads
import torch

from bench import study
from bench.common import ROOT

from bundled.digits import BUNDLED_CKPT, NUM_CLASSES
from quant.io.files import atomic_path


@torch.no_grad()
def sample_row(model, labels, seed, steps, cfg_scale):
    from diffusion.sampling import make_sampler, sample_inputs
    sampler = make_sampler(model, steps, cfg_scale, clip_denoised=True)
    gens, y, z = sample_inputs(seed, range(len(labels)), NUM_CLASSES, (3, 16, 16), labels)
    return sampler(z, y, gens).clamp(-1, 1)


def load_fp(ckpt):
    from types import SimpleNamespace
    from ditas.pipeline import build_model
    args = SimpleNamespace(model="DiT-T/2", ckpt=ckpt, image_size=16, num_classes=NUM_CLASSES, vae="none",
                           num_sampling_steps=50, cfg_scale=1.5)
    return build_model(args)


def load_q(qdir):
    from quant.io.checkpoint import load_quantized
    from quant.method.fold import fold_smoothing
    model, _ = load_quantized(qdir)
    return fold_smoothing(model).eval()


def methods_png(rows, path, upscale=3, pad=2, label_width=330):
    """rows: [(label, images (K, 3, H, W) in [-1, 1])] -> one PNG with the labels on the left."""
    from PIL import Image, ImageDraw
    k, _, h, w = rows[0][1].shape
    H, W = h * upscale, w * upscale
    img = Image.new("RGB", (label_width + k * (W + pad) + pad, len(rows) * (H + pad) + pad), "white")
    draw = ImageDraw.Draw(img)
    for r, (label, x) in enumerate(rows):
        top = pad + r * (H + pad)
        draw.text((4, top + H // 2 - 6), label, fill="black")
        arr = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for c in range(k):
            tile = Image.fromarray(arr[c]).resize((W, H), Image.NEAREST)
            img.paste(tile, (label_width + pad + c * (W + pad), top))
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp)


def read_report(qdir):
    with open(os.path.join(qdir, "report.json")) as f:
        return json.load(f)["layers"]


def layers_png(panels, path):
    """panels: [(title, {"search": report, "ditas": report})] -> alpha and error per layer."""
    plt = study.pyplot()
    if plt is None:
        print("layers.png skipped: matplotlib is not installed (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(len(panels), 2, figsize=(14, 3.2 * len(panels)), squeeze=False)
    for row, (title, reps) in enumerate(panels):
        names = list(reps["ditas"])
        x = list(range(len(names)))
        short = [n.replace("blocks.", "").replace("attn.", "").replace("mlp.", "") for n in names]
        ax = axes[row][0]
        for key, style, lab in (("search", "o-", "searched, no LoRA"), ("ditas", "s--", "searched + LoRA (DiTAS)"),
                                ("approx", "x:", "approx search + LoRA")):
            if key in reps:
                ax.plot(x, [reps[key][n]["alpha"] if reps[key][n]["alpha"] is not None else float("nan")
                            for n in names], style, ms=4, label=lab)
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("alpha")
        ax.set_title(f"{title}: chosen alpha")
        ax = axes[row][1]
        ax.semilogy(x, [reps["ditas"][n]["output_error_rtn"] for n in names], "o-", ms=4,
                    label="before smoothing (RTN)")
        if "search" in reps:
            ax.semilogy(x, [reps["search"][n]["output_error"] for n in names], "s-", ms=4,
                        label="after smoothing (searched alpha, no LoRA)")
        ax.semilogy(x, [reps["ditas"][n]["output_error"] for n in names], "^-", ms=4,
                    label="after smoothing + LoRA (DiTAS)")
        ax.set_ylabel("output MSE per step")
        ax.set_title(f"{title}: layer output error on the calibration inputs")
        for a in axes[row]:
            a.set_xticks(x)
            a.set_xticklabels(short, rotation=90, fontsize=6)
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=study.QUICK["steps"])
    p.add_argument("--calib-steps", type=int, default=None)
    p.add_argument("--bits", type=study.parse_bits, nargs="+", default=[(4, 8), (8, 8)])
    p.add_argument("--schemes", nargs="+", choices=("ditas", "reference"), default=["ditas", "reference"])
    p.add_argument("--methods", nargs="+", choices=list(study.METHODS), default=study.DEFAULT_METHODS)
    p.add_argument("--seed", type=int, default=0, help="noise seed of the columns")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--upscale", type=int, default=3)
    threads.add_threads_arg(p)
    p.add_argument("--ckpt", default=BUNDLED_CKPT)
    p.add_argument("--results-dir", default=os.path.join("results", "bench"))
    p.add_argument("--out-dir", default=os.path.join("bench", "results"))
    p.add_argument("--skip-samples", action="store_true", help="only layers.png")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    threads.set_threads(args.threads)
    torch.set_grad_enabled(False)
    bench = study.Bench(args.ckpt, args.results_dir, args.cfg_scale, calib_steps=args.calib_steps)
    os.makedirs(args.out_dir, exist_ok=True)
    command = "python bench/pictures.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(command)

    labels = list(range(NUM_CLASSES))
    if not args.skip_samples:
        rows = [("FP", sample_row(load_fp(args.ckpt), labels, args.seed, args.steps, args.cfg_scale))]
        for bits in args.bits:
            for scheme in args.schemes:
                for method in args.methods:
                    qdir = bench.checkpoint(bits, scheme, method, args.steps)
                    label = f"W{bits[0]}A{bits[1]} {scheme}: {study.METHODS[method][0]}"
                    rows.append((label, sample_row(load_q(qdir), labels, args.seed, args.steps, args.cfg_scale)))
                    study.log(label)
        path = os.path.join(args.out_dir, "methods.png")
        methods_png(rows, path, upscale=args.upscale)
        print(f"wrote {path}: rows {', '.join(r[0] for r in rows)}; columns labels {labels}, seed {args.seed}")

    panels = []
    for bits in args.bits:
        for scheme in args.schemes:
            reps = {m: read_report(bench.checkpoint(bits, scheme, m, args.steps))
                    for m in ("search", "ditas") if m in args.methods}
            if "ditas" not in reps:
                continue
            panels.append((f"W{bits[0]}A{bits[1]} {scheme}", reps))
    path = os.path.join(args.out_dir, "layers.png")
    if panels and layers_png(panels, path):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
