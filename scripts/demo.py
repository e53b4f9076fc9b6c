"""The whole job on the bundled digits model, as a user would run it, in one command.

    quantize (W8A8, W4A8)  ->  sample FP and quantized over 2 processes (integer backend)  ->  evaluate  ->  table

    python scripts/demo.py                         # the quick setting: about 4 minutes on 2 cores
    python scripts/demo.py --full                  # the larger setting: 500 samples, 50 steps, cfg 4
    python scripts/demo.py --calib-seed 2          # another calibration noise draw (the README's spread)

Each stage is the repository's own script in a subprocess (QuantDiT.py, sample_merge_TAS.py under launch.py
-- torchrun with one-line input errors --, evaluator.py --features digits). Everything lands in --out, in
folders named by every setting a stage depends on, so a rerun reuses exactly the stages whose settings
match and never mixes results of different settings: the quantized checkpoints (with their FP-vs-quantized
previews), the .npz sample batches and their metrics, a grid of the first samples of every row
(samples.png) and table.md.
"""
import json
import os
import subprocess
import sys
import time

from ditas import threads  # noqa: F401  (before torch: sets OpenMP's wait policy, read when torch loads)
import numpy as np

from bundled.digits import BUNDLED_FLAGS
from ditas.cli import ArgumentParser, UserError, check_positive, check_seed, check_writable, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUICK = dict(num_samples=300, steps=20, cfg_scale=4.0)
FULL = dict(num_samples=500, steps=50, cfg_scale=4.0)
BITS = ((8, 8), (4, 8))


def sh(*argv, nproc=1):
    """Run a repository script (over `nproc` processes through launch.py); stream its output, stop on failure."""
    cmd = [sys.executable] + (["launch.py", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [])
    cmd += [str(a) for a in argv]
    print("+", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode:
        sys.exit(proc.returncode)


def npz_in(directory):
    found = sorted(f for f in os.listdir(directory) if f.endswith(".npz"))
    if len(found) != 1:
        sys.exit(f"error: expected one .npz in {directory}, found {found}")
    return os.path.join(directory, found[0])


def quantize(args, bits, steps):
    """The checkpoint of one bit width: made once per (bits, calibration steps, calibration seed)."""
    w, a = bits
    qdir = os.path.join(args.out, f"W{w}A{a}-steps{steps}-calibseed{args.calib_seed}")
    if os.path.isdir(qdir):
        print(f"reusing {qdir} (same bits, steps and calibration seed)", flush=True)
    else:
        sh("QuantDiT.py", *BUNDLED_FLAGS, "--num-sampling-steps", steps, "--weight-bit", w, "--act-bit", a,
           "--seed", args.calib_seed, "--out", qdir, "--upscale", 4, "--threads", args.threads)
    return qdir


def sample_and_score(args, label, qdir, n, steps, cfg):
    """(metrics, uint8 images) of one row; its folder is named by every setting the samples depend on."""
    from bundled.classifier import label_accuracy
    from diffusion.sampling import sample_labels
    tag = os.path.basename(qdir) if qdir else "FP"
    sample_dir = os.path.join(args.out, "samples", f"{tag}-n{n}-steps{steps}-cfg{cfg}-seed{args.seed}")
    source = ["--path", qdir, "--backend", "int"] if qdir else BUNDLED_FLAGS
    sh("sample_merge_TAS.py", *source, "--num-sampling-steps", steps, "--cfg-scale", cfg, "--sample-dir", sample_dir,
       "--num-fid-samples", n, "--per-proc-batch-size", args.batch_size, "--global-seed", args.seed, nproc=args.nproc)
    npz = npz_in(sample_dir)
    metrics_path = os.path.join(sample_dir, "metrics.json")
    sh("evaluator.py", os.path.join("assets", "digits_ref.npz"), npz, "--features", "digits", "--json", metrics_path,
       "--threads", args.threads)
    with open(metrics_path) as f:
        m = json.load(f)
    images = np.load(npz)["arr_0"]
    m["label_acc"] = label_accuracy(images, sample_labels(args.seed, len(images), 10))
    return m, images


def check_args(args):
    """Every number and --out, before --out is made (the stages would find a bad one only after that)."""
    for flag in ("nproc", "batch_size", "threads", "num_samples", "steps"):
        if getattr(args, flag) is not None:
            check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.steps is not None and not 2 <= args.steps <= 1000:
        raise UserError(f"--steps must be in 2..1000, got {args.steps}")
    if args.cfg_scale is not None and not 1 <= args.cfg_scale < float("inf"):
        raise UserError(f"--cfg-scale must be a finite number >= 1, got {args.cfg_scale}")
    check_seed(args.seed)
    check_seed(args.calib_seed, "--calib-seed")
    check_writable(args.out, "--out", kind="dir")


def main(args):
    import torch

    from ditas.pipeline import save_grid
    t0 = time.time()
    base = FULL if args.full else QUICK
    n = args.num_samples or base["num_samples"]
    steps = args.steps or base["steps"]
    cfg = args.cfg_scale or base["cfg_scale"]
    args.out = os.path.abspath(args.out)
    check_args(args)
    os.makedirs(args.out, exist_ok=True)
    rows = [("FP", None)] + [(f"W{w}A{a} DiTAS", quantize(args, (w, a), steps)) for w, a in BITS]
    table, grids = [], []
    for label, qdir in rows:
        m, images = sample_and_score(args, label, qdir, n, steps, cfg)
        table.append(f"| {label} | {m['fid']:.2f} | {m['inception_score']:.2f} | {m['precision']:.3f} | "
                     f"{m['recall']:.3f} | {100 * m['label_acc']:.1f}% |")
        grids.append(images[:16])
    grid = torch.from_numpy(np.concatenate(grids)).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_grid(grid, os.path.join(args.out, "samples.png"), nrow=16, upscale=4)
    header = [f"{n} samples per row, {steps} DDPM steps (calibration too), cfg {cfg}, sampling seed {args.seed}, "
              f"calibration seed {args.calib_seed}, {args.nproc} processes, integer backend for the quantized rows; "
              "features: the bundled digit classifier", "",
              "| model | FID-digits | IS-digits | precision | recall | classified as their label |",
              "|---|---|---|---|---|---|"]
    text = "\n".join(header + table) + "\n"
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    print("\n" + text)
    print(f"images: {os.path.join(args.out, 'samples.png')} (rows: {', '.join(r[0] for r in rows)}) and the "
          f"previews {args.out}/W*A8-*/samples.png (FP top, quantized bottom); {time.time() - t0:.0f} s in all")


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.path.join("results", "demo"), help="where everything goes (default: %(default)s)")
    p.add_argument("--full", action="store_true",
                   help=f"the larger setting: {FULL['num_samples']} samples, {FULL['steps']} steps "
                        f"(default: {QUICK['num_samples']} samples, {QUICK['steps']} steps)")
    p.add_argument("--num-samples", type=int, default=None, help="samples per row (overrides the setting's)")
    p.add_argument("--steps", type=int, default=None, help="DDPM steps of calibration and sampling (overrides)")
    p.add_argument("--cfg-scale", type=float, default=None, help="sampling guidance (overrides; the setting's is 4)")
    p.add_argument("--batch-size", type=int, default=50, help="samples per shard and forward (default: %(default)s)")
    p.add_argument("--nproc", type=int, default=2, help="sampling processes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--calib-seed", type=int, default=1, help="calibration noise seed (QuantDiT.py --seed; "
                                                             "default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="threads of the quantize and evaluate stages "
                                                          "(default: %(default)s; sampling: 1 per process)")
    return p


if __name__ == "__main__":
    run(main, build_parser().parse_args())
