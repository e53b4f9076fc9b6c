"""The whole job on the bundled digits model, as a user would run it, in one command.

    quantize (W8A8, W4A8)  ->  sample FP and quantized over torchrun  ->  evaluate  ->  one table

Each stage is the repository's own script in a subprocess (QuantDiT.py, sample_merge_TAS.py under
torch.distributed.run, evaluator.py --features digits). Everything lands in --out: the quantized
checkpoints (with their FP-vs-quantized previews), the .npz sample batches, a grid of the first
samples of every row, and table.md.
"""
import argparse
import json
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import threads  # noqa: E402,F401  (before torch: sets OpenMP's wait policy, read when torch loads)
import numpy as np  # noqa: E402

from bundled.digits import BUNDLED_FLAGS  # noqa: E402


def sh(*argv, torchrun=0):
    """Run a repository script (under torchrun when torchrun > 1); stream its output, stop on failure."""
    cmd = [sys.executable]
    if torchrun > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
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


def main(args):
    from bundled.classifier import label_accuracy
    from pipeline import sample_labels, save_grid
    os.makedirs(args.out, exist_ok=True)
    steps = ["--num-sampling-steps", args.steps]
    rows = [("FP", None)]
    for w, a in ((8, 8), (4, 8)):
        qdir = os.path.join(args.out, f"W{w}A{a}")
        if not os.path.isdir(qdir):
            sh("QuantDiT.py", *BUNDLED_FLAGS, *steps, "--weight-bit", w, "--act-bit", a,
               "--out", qdir, "--upscale", 4)
        rows.append((f"W{w}A{a} DiTAS", qdir))

    table, grids = [], []
    for label, qdir in rows:
        sample_dir = os.path.join(args.out, "samples", label.split()[0])
        source = ["--path", qdir] if qdir else BUNDLED_FLAGS
        sh("sample_merge_TAS.py", *source, *steps, "--cfg-scale", args.cfg_scale, "--sample-dir", sample_dir,
           "--num-fid-samples", args.num_samples, "--per-proc-batch-size", args.batch_size,
           "--global-seed", args.seed, torchrun=args.nproc)
        npz = npz_in(sample_dir)
        metrics_path = os.path.join(sample_dir, "metrics.json")
        sh("evaluator.py", os.path.join("assets", "digits_ref.npz"), npz, "--features", "digits",
           "--json", metrics_path)
        with open(metrics_path) as f:
            m = json.load(f)
        images = np.load(npz)["arr_0"]
        acc = label_accuracy(images, sample_labels(args.seed, len(images), 10))
        table.append(f"| {label} | {m['fid']:.2f} | {m['inception_score']:.2f} | {m['precision']:.3f} | "
                     f"{m['recall']:.3f} | {100 * acc:.1f}% |")
        grids.append(images[:16])

    import torch
    grid = torch.from_numpy(np.concatenate(grids)).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_grid(grid, os.path.join(args.out, "samples.png"), nrow=16, upscale=4)
    header = [f"{args.num_samples} samples per row, {args.steps} DDPM steps, cfg {args.cfg_scale}, "
              f"seed {args.seed}, {args.nproc} processes; features: the bundled digit classifier", "",
              "| model | FID-digits | IS-digits | precision | recall | classified as their label |",
              "|---|---|---|---|---|---|"]
    text = "\n".join(header + table) + "\n"
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    print("\n" + text)
    print(f"images: {os.path.join(args.out, 'samples.png')} (rows: {', '.join(r[0] for r in rows)}) and "
          f"{args.out}/W*A8/samples.png (FP top, quantized bottom)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="results/demo")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    main(p.parse_args())
