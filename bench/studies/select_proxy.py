"""Question: can a short sampling run tell a good W4A8 checkpoint from a bad one, so that calibration can choose
between options end to end (QuantConfig smoothing "select")?
Answer: see docs/METHOD.md §16 (numbers from this script, the command there): yes; the quality of a checkpoint is
systematic, and 32 other samples, or the calibration batch's own loop, rank checkpoints as 200 samples do.

    python bench/studies/select_proxy.py --threads 1 --table bench/results/calib_spread_8seeds.json

For every checkpoint of the table's settings and calibration seeds (bench/calib_spread.py's json, its checkpoints
in --results-dir): its table PSNR (200 samples, sampling seed 0), the PSNR of --num-samples samples at another
sampling seed (--seed), and select's own criterion, quant/calibration/select.py end_to_end_psnr of the calibration
loop (the checkpoint's calibration labels and seed, 10 steps, cfg 1.5, clipped) against the FP model's. Prints
their Pearson correlations with the table PSNR, over all checkpoints and per setting.
"""
import argparse
import json
import os

from ditas import threads  # before torch
import numpy as np
import torch

from bench.study import Bench, mean_psnr, model_flags
from bundled.digits import BUNDLED_CKPT
from quant.calibration.loop import fp_calibration_loop
from quant.calibration.select import end_to_end_psnr, final_samples
from quant.io.checkpoint import load_quantized


def calibration_psnr(model, fp_final, meta):
    """select's criterion for a loaded checkpoint: its calibration loop's final samples against the FP loop's."""
    loop = fp_calibration_loop(model, meta["calib_labels"], seed=meta["seed"], steps=meta["num_sampling_steps"],
                               cfg_scale=meta["calib_cfg_scale"], clip_denoised=meta["calib_clip_x0"])
    return end_to_end_psnr(final_samples(loop), fp_final)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default=os.path.join("bench", "results", "calib_spread_8seeds.json"))
    p.add_argument("--settings", nargs="+", default=["fixed-bc", "n16-bc", "fixed", "n16", "rtn-bc"])
    p.add_argument("--seed", type=int, default=1, help="the other sampling seed")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--results-dir", default=os.path.join("results", "bench"))
    threads.add_threads_arg(p)
    args = p.parse_args(argv)
    threads.set_threads(args.threads)
    torch.set_grad_enabled(False)
    import QuantDiT
    from ditas.pipeline import build_model
    fp_model = build_model(QuantDiT.build_parser().parse_args(model_flags(BUNDLED_CKPT)))
    with open(args.table) as f:
        table = json.load(f)["results"]
    bench = Bench(BUNDLED_CKPT, args.results_dir)
    fp_other = bench.samples(None, args.seed, args.num_samples, 10)
    fp_final = {}
    rows = []  # (setting, calibration seed, table PSNR, other-seed PSNR, calibration-loop PSNR)
    for name in args.settings:
        for seed, cell in table[name].items():
            qdir = os.path.join(args.results_dir, os.path.relpath(cell["dir"], "results/bench"))
            model, meta = load_quantized(qdir)
            key = (meta["seed"], tuple(meta["calib_labels"]))
            if key not in fp_final:
                fp_final[key] = final_samples(fp_calibration_loop(
                    fp_model, meta["calib_labels"], seed=meta["seed"], steps=meta["num_sampling_steps"],
                    cfg_scale=meta["calib_cfg_scale"], clip_denoised=meta["calib_clip_x0"]))
            other = mean_psnr(bench.samples(qdir, args.seed, args.num_samples, 10), fp_other)
            rows.append((name, seed, cell["psnr"], other, calibration_psnr(model.eval(), fp_final[key], meta)))
            print(f"{name} seed {seed}: {cell['psnr']:.2f} / {other:.2f} / {rows[-1][4]:.2f} dB", flush=True)

    def corr(sel):
        a = np.array([r[2:] for r in sel])
        return np.corrcoef(a[:, 0], a[:, 1])[0, 1], np.corrcoef(a[:, 0], a[:, 2])[0, 1]
    print(f"\n| checkpoints | n | r, {args.num_samples} samples at sampling seed {args.seed} | r, the calibration "
          f"loop (select's criterion) |\n|---|---|---|---|")
    for what, sel in [("all", rows)] + [(n, [r for r in rows if r[0] == n]) for n in args.settings]:
        r_other, r_calib = corr(sel)
        print(f"| {what} | {len(sel)} | {r_other:.3f} | {r_calib:.3f} |")


if __name__ == "__main__":
    main()
