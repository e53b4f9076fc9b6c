"""Question: how stable is the exhaustive alpha search's choice against small changes of the problem?

Answer (bench/results/search_noise.md): the chosen alpha is not stable, the loss over alpha is flat. A float64 SVD
keeps 31/32 layers' alphas, but weights x (1 + 1e-5 N(0, 1)) keep 11/32 and the subspace SVD (the ditas default)
6/32, while the output error at the chosen alpha moves by -0.63 % on average (-14 % / +8.7 % per layer). Equal
alphas to the exhaustive search are therefore no target for the default fits (candidate_fits.py, table C).

    python bench/studies/search_noise.py              # the bundled DiT-T/2, 10 steps, 16 labels (~5 min on one thread)

The exhaustive ditas search (QuantConfig(svd="full"): a LAPACK full SVD in every iteration of every
LoRA fit) is run once as the baseline, then three times with one change each, every run on a
fresh copy of the model with the same calibration noise:

* float64 SVD: the same fits with every SVD computed in float64 (a change at float32's rounding);
* weights x (1 + 1e-5 e): every quantized layer's weight times 1 + 1e-5 N(0, 1) (the FP model too);
* subspace SVD: the ditas default (QuantConfig(), quant/method/lora.py's warm-started subspace iteration).

Per change: the layers whose alpha equals the baseline's, and the change of each layer's output error
at its chosen alpha (the search loss there). Writes bench/results/search_noise.md (+ .json).
"""
import contextlib
import copy
import json
import os
import sys
import time

from ditas import threads  # first: sets OpenMP's wait policy, read when torch loads
from ditas import cli
import torch
from bench.studies.fits import build_model, pct, spread
from bench.common import ROOT, cpu_name, write_report
from config import calib_labels
from quant import fp_calibration_loop
from quant.calibration.driver import quantize_dit
from quant.quant_config import QuantConfig
from quant.method.layers import quantizable_layers

SEED = 1


@contextlib.contextmanager
def float64_svd():
    """torch.linalg.svd computed in float64 and returned in the input's dtype, for the duration."""
    svd = torch.linalg.svd

    def svd64(a, full_matrices=True, **kw):
        return tuple(t.to(a.dtype) for t in svd(a.double(), full_matrices=full_matrices, **kw))
    torch.linalg.svd = svd64
    try:
        yield
    finally:
        torch.linalg.svd = svd


def calibrate(model, cfg, steps, labels, setting, perturb=0.0):
    m = copy.deepcopy(model)
    if perturb:
        g = torch.Generator().manual_seed(123)
        for lin in quantizable_layers(m).values():
            lin.weight.mul_(1 + perturb * torch.randn(lin.weight.shape, generator=g))
    loop = fp_calibration_loop(m, labels, seed=SEED, steps=steps, clip_denoised=setting["clip"])
    return quantize_dit(m, cfg, loop, progress=False)["layers"]


def main(args):
    threads.set_threads(args.threads)
    torch.set_grad_enabled(False)
    model, setting = build_model("bundled")
    labels = calib_labels(setting["classes"])[:args.labels]
    load0, t0 = os.getloadavg(), time.perf_counter()
    base = calibrate(model, QuantConfig(svd="full"), args.steps, labels, setting)
    changes = {}
    with float64_svd():
        changes["float64 SVD"] = calibrate(model, QuantConfig(svd="full"), args.steps, labels, setting)
    changes["weights x (1 + 1e-5 e)"] = calibrate(model, QuantConfig(svd="full"), args.steps, labels, setting,
                                                 perturb=1e-5)
    changes["subspace SVD (the ditas default)"] = calibrate(model, QuantConfig(), args.steps, labels, setting)
    rows, data = [], {}
    for name, layers in changes.items():
        same = sum(layers[n]["alpha"] == base[n]["alpha"] for n in base)
        out = spread([layers[n]["output_error"] / base[n]["output_error"] for n in base])
        rows.append(f"| {name} | {same}/{len(base)} ({100 * same / len(base):.0f}%) | {pct(out)} |")
        data[name] = {n: {"alpha": layers[n]["alpha"], "output_error": layers[n]["output_error"]} for n in base}
    load1 = os.getloadavg()
    write_report(args.out, [
        "# The exhaustive alpha search against small changes of the problem", "",
        f"Command: `{' '.join(['python', 'bench/studies/search_noise.py', *sys.argv[1:]])}`", "",
        f"The bundled DiT-T/2, ditas W4A8 defaults otherwise (21 alphas, LoRA rank 32, 10 iterations), {args.steps} "
        f"DDPM steps, {len(labels)} labels, cfg 1.5, calibration seed {SEED}; baseline: `QuantConfig(svd=\"full\")`. "
        f"{cpu_name()}, {args.threads} thread(s); load average {load0[0]:.2f} before, {load1[0]:.2f} after; "
        f"{time.perf_counter() - t0:.0f} s.", "",
        "| change | alpha equal to the baseline's | output error at the chosen alpha, change - 1: mean (min / max) |",
        "|---|---:|---|", *rows])
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"baseline": {n: {"alpha": r["alpha"], "output_error": r["output_error"]} for n, r in base.items()},
                   "changes": data}, f, indent=1)


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=10, help="calibration DDPM steps")
    p.add_argument("--labels", type=int, default=16, help="calibration labels")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "search_noise.md"), help="the report")
    return p


if __name__ == "__main__":
    cli.run(main, build_parser().parse_args())
