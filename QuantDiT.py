"""Quantize a pretrained DiT with DiTAS (data-free): calibrate, smooth (TAS), fit LoRA, correct biases, save.

    python QuantDiT.py --image-size 256 --seed 1 --model DiT-XL/2 --act-bit 8 --weight-bit 4 \
        --num-sampling-steps 100

writes a self-contained checkpoint directory (see quant/io/checkpoint.py) that
sample_merge_TAS.py and sample.py load without the FP checkpoint. Scales, LoRA factors and the
untouched FP tensors are stored in fp16 (--storage-dtype fp32 for exactness studies); the
quantized model is rounded to what is stored before the preview, so samples.png shows exactly
the model that loads back. --quantize-adaln also quantizes every block's adaLN linear
(weight-only 8-bit per output channel), which shrinks a DiT-XL/2 checkpoint by another third.
"""
import argparse
import os
import time

from ditas import threads  # before torch: sets OpenMP's wait policy, read when torch loads
import torch

from config import CALIB_SAMPLES, DEFAULTS, calib_set
from ditas.cli import (ArgumentParser, UserError, add_device_arg, add_model_args, add_tf32_arg, check_common_args,
                       check_positive, check_seed, check_writable, latent_shape, pick_device, run, set_tf32)
from ditas.pipeline import build_model, decode, init_distributed, load_vae, on_every_rank, save_grid
from diffusion.sampling import make_sampler, sample_inputs
from ditas.quant_args import add_quant_args, default_out_dir, quant_config_from_args
from quant.calibration.budget import GIB
from quant.calibration.driver import plan_calibration, quantize_dit
from quant.calibration.loop import fp_calibration_loop
from quant.calibration.ranks import Ranks
from quant.io.checkpoint import is_quantized_checkpoint, save_quantized
from quant.io.storage import DEFAULT_STORAGE_DTYPE, STORAGE_DTYPES, round_for_storage


def main(args):
    return on_every_rank(_main, args)


def _main(args):
    # Check every input before the (slow, large) model is built; nothing is written on the way to an error
    threads.set_threads(args.threads)
    torch.set_grad_enabled(False)
    cfg = quant_config_from_args(args)
    check_seed(args.seed)
    check_positive(args.upscale, "--upscale")
    check_common_args(args)
    latent_shape(args)
    out_dir = args.out or default_out_dir(args, cfg)
    if os.path.exists(out_dir) and not args.overwrite:
        what = "a quantized checkpoint" if is_quantized_checkpoint(out_dir) else "files"
        raise UserError(f"{out_dir} already holds {what}; pass --overwrite to replace it or choose --out")
    check_writable(out_dir, "--out" if args.out else "--results-dir", kind="dir")
    if args.calib_samples is not None and args.calib_samples < 1:
        raise UserError(f"--calib-samples must be a positive integer, got {args.calib_samples}")
    labels = calib_set(args.num_classes, args.calib_labels, args.calib_samples)
    args.preview_labels = args.preview_labels or labels[:8]
    for flag, given in (("--calib-labels", labels), ("--preview-labels", args.preview_labels)):
        if any(not 0 <= y < args.num_classes for y in given):
            raise UserError(f"{flag}: labels must lie in [0, {args.num_classes}) (--num-classes)")
    if not 1 <= args.calib_cfg_scale < float("inf"):
        raise UserError(f"--calib-cfg-scale must be a finite number >= 1, got {args.calib_cfg_scale}")
    if not 0 < args.calib_memory_gb < float("inf"):
        raise UserError(f"--calib-memory-gb must be positive, got {args.calib_memory_gb:g}")
    if args.calib_chunks < 1 or len(labels) % args.calib_chunks:
        raise UserError(f"--calib-chunks {args.calib_chunks}: must divide the {len(labels)} calibration labels "
                        f"into equal chunks")
    # Several processes under torchrun: each calibrates its share of the layers, rank 0 writes
    device = init_distributed(pick_device(args.device))
    set_tf32(args.tf32)  # the float32 arithmetic the search measures; recorded for sampling (meta "tf32")
    ranks = Ranks.current()
    ranks.agree(vars(args), "flags")
    lead = ranks.rank == 0
    vae = load_vae(args.vae, device) if args.preview and lead else None

    # Load the FP model
    model = build_model(args)
    budget = round(args.calib_memory_gb * GIB)
    clip = args.vae == "none"  # the preview samples as sample.py does; the calibration loops as --calib-clip says
    calib_clip = cfg.clips_x0(pixel_space=clip)
    # the same fixed noise batch every pass (each sample's own streams): the FP trajectory is identical each time
    loop = fp_calibration_loop(model, labels, seed=args.seed, steps=args.num_sampling_steps,
                               cfg_scale=args.calib_cfg_scale, clip_denoised=calib_clip,
                               chunks=args.calib_chunks, progress=lead)
    try:  # the layers, the ranks and the memory budget fit, before any FP loop
        plan_calibration(model, cfg, budget, ranks, device.type, chunks=args.calib_chunks, loop_shape=loop.shape)
    except ValueError as e:
        raise UserError(str(e)) from None
    model = model.to(device)
    torch.manual_seed(args.seed)
    shape = (model.in_channels, model.x_embedder.img_size, model.x_embedder.img_size)

    if lead:
        print(f"calibrating {args.model} ({len(labels)} labels, cfg {args.calib_cfg_scale}, "
              f"{args.num_sampling_steps} steps, {torch.get_num_threads()} threads, "
              f"OpenMP wait {threads.wait_policy()}, "
              f"{ranks.world} process(es)); {cfg}",
              flush=True)
    t0 = time.time()
    preview = None
    if args.preview and lead:
        # FP preview before the layers are swapped: the quantized one below uses the same noise
        sampler = make_sampler(model, args.num_sampling_steps, args.cfg_scale, clip_denoised=clip)
        gens, y, z = sample_inputs(args.seed, range(len(args.preview_labels)), args.num_classes, shape,
                                   args.preview_labels)
        preview = [decode(vae, sampler(z, y, gens, progress="preview: FP model"))]
    report = quantize_dit(model, cfg, loop, progress=lead,
                          memory_budget=budget, ranks=ranks)
    if not lead:
        return None
    # from here on the model is exactly what the checkpoint stores (and load_quantized returns)
    round_for_storage(model, args.storage_dtype)
    if args.preview:
        t1 = time.time()
        gens, y, z = sample_inputs(args.seed, range(len(args.preview_labels)), args.num_classes, shape,
                                   args.preview_labels)
        preview.append(decode(vae, sampler(z, y, gens, progress="preview: quantized model")))
        report["timings"]["quantized_preview_s"] = time.time() - t1
    report["timings"]["total_s"] = time.time() - t0

    meta = {
        "model": args.model, "image_size": args.image_size, "num_classes": args.num_classes, "vae": args.vae,
        "in_channels": model.in_channels, "seed": args.seed, "num_sampling_steps": args.num_sampling_steps,
        "calib_cfg_scale": args.calib_cfg_scale, "calib_labels": labels, "calib_chunks": args.calib_chunks,
        "ckpt": args.ckpt, "tf32": args.tf32, "calib_clip_x0": calib_clip,
        **cfg.to_dict(),
        "alphas": {name: r["alpha"] for name, r in report["layers"].items()},
    }
    extra = {}
    if preview:
        grid = torch.cat(preview)
        extra["samples.png"] = lambda p: save_grid(grid, p, nrow=len(args.preview_labels), upscale=args.upscale)
    save_quantized(model, meta, report, out_dir, overwrite=args.overwrite, extra_files=extra,
                   storage_dtype=args.storage_dtype)
    errs = [r["output_error"] / max(r["output_error_rtn"], 1e-30) for r in report["layers"].values()]
    before = " before bias correction" if cfg.bias_correction else ""
    print(f"saved {out_dir} in {report['timings']['total_s']:.0f}s; mean output error vs round-to-nearest{before}: "
          f"{sum(errs) / len(errs):.3f}x")
    return out_dir


def build_parser():
    d = DEFAULTS
    parser = ArgumentParser(description=__doc__)
    add_model_args(parser, image_size=d.image_size, num_classes=d.num_classes, vae=d.vae, cfg_scale=d.cfg_scale,
                   steps=d.num_sampling_steps)
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="calibration and preview noise seed (any integer in [0, 2^63 - 1])")
    add_quant_args(parser)
    parser.add_argument("--storage-dtype", choices=STORAGE_DTYPES, default=DEFAULT_STORAGE_DTYPE,
                        help="dtype of scales, LoRA factors and the FP tensors in the checkpoint "
                             "(fp32 for exactness studies)")
    parser.add_argument("--calib-memory-gb", type=float, default=d.calib_memory_gb, metavar="GIB",
                        help="search state one process may hold, in GiB (quant/calibration/budget.py); layers "
                             "beyond it are calibrated in groups, each over its own FP sampling loop (same result, "
                             "more loops). "
                             "The FP model and the sampling activations come on top")
    parser.add_argument("--calib-chunks", type=int, default=d.calib_chunks, metavar="N",
                        help="run each FP calibration loop's batch as N equal chunks of samples, in turn at every "
                             "step (the results depend on N, not on the number of processes). Under torchrun with "
                             "N a multiple of the processes, each runs its share of the chunks and observes every "
                             "layer; the per-chunk statistics and loss sums and the kept candidates travel between "
                             "them once per loop (for CPU processes, where the FP loops dominate). 1: every process "
                             "runs the whole batch and observes its own layers, nothing sent (GPUs). Needs "
                             "activation ranges per row or token when N > 1")
    parser.add_argument("--calib-cfg-scale", type=float, default=d.calib_cfg_scale,
                        help="guidance of the FP calibration loops (the paper's 1.5)")
    parser.add_argument("--calib-labels", type=int, nargs="+", default=None,
                        help="calibration class labels (default: the released 16 ImageNet labels, for other "
                             "class counts 0, 1, ...), cycled to --calib-samples")
    parser.add_argument("--calib-samples", type=int, default=d.calib_samples, metavar="N",
                        help=f"calibration samples, each with its own noise: the labels cycled to N (default: "
                             f"{CALIB_SAMPLES}, the released batch; with --calib-labels, their number)")
    parser.add_argument("--preview-labels", type=int, nargs="+", default=None,
                        help="preview class labels (default: the first 8 calibration labels)")
    parser.add_argument("--preview", action=argparse.BooleanOptionalAction, default=True,
                        help="write samples.png: FP (top) vs quantized (bottom) from the same noise")
    parser.add_argument("--upscale", type=int, default=1, help="nearest upscaling of preview images")
    add_device_arg(parser)
    add_tf32_arg(parser)
    threads.add_threads_arg(parser)
    parser.add_argument("--results-dir", type=str, default="results",
                        help="where the output directory (named from the setting) goes without --out")
    parser.add_argument("--out", type=str, default=None, help="output directory (default: named from the setting)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser


if __name__ == "__main__":
    run(main, build_parser().parse_args())
