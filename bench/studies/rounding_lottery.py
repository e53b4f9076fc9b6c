"""Question: is the W4A8 checkpoint's spread over calibration draws a matter of the TAS statistic's noise (which more
calibration data would settle), or of the model's sensitivity to any change in the weights' rounding?
Answer: see docs/METHOD.md §16 (numbers from this script, the command there): smoothing factors jittered by 1 % (a
third of what a calibration draw moves them) spread the PSNR against FP as widely as another draw does.

    python bench/studies/rounding_lottery.py --threads 1

One calibration draw (--calib-seed) of QuantDiT's TAS at alpha 0.5 with bias correction (bench/calib_spread.py's
fixed-bc row), then the same with every layer's smoothing factors s multiplied by 1 + eps * N(0, 1) (one generator
per jitter seed, drawn layer by layer in calibration order) before quantization; each checkpoint sampled as
bench/calib_spread.py does (200 samples, sampling seed 0, 10 steps, PSNR against the FP samples of the same noise).
"""
import argparse
import os
from unittest import mock

from ditas import threads  # before torch
import torch

from bench.calib_spread import N16, SETTINGS
from bench.study import Bench, log, machine, mean_psnr, model_flags
from bundled.digits import BUNDLED_CKPT
from quant.io.checkpoint import is_quantized_checkpoint
from quant.search import candidates


class JitterBench(Bench):
    """Bench whose checkpoints may have their smoothing factors jittered."""

    def quant_flags(self, calib_seed):
        """QuantDiT.py's flags of a W4A8 checkpoint of the model at calib_seed, before the setting's own."""
        return model_flags(self.ckpt) + ["--weight-bit", "4", "--act-bit", "8", "--num-sampling-steps", "10",
                                         "--no-preview", "--device", "cpu", "--seed", str(calib_seed)]

    def jittered(self, eps, seed, calib_seed, flags):
        """The checkpoint of `flags` at calib_seed with s jittered by eps (jitter seed `seed`); cached by name."""
        import QuantDiT
        out = os.path.join(self.results_dir, "ckpt", f"lottery-e{eps:g}-j{seed}-cs{calib_seed}-{self.digest}")
        if is_quantized_checkpoint(out):
            return out
        g = torch.Generator().manual_seed(seed)
        real = candidates.smoothing_factors

        def jitter(*args, **kwargs):
            s = real(*args, **kwargs)
            return s * (1 + eps * torch.randn(s.shape, generator=g)).to(s)
        argv = self.quant_flags(calib_seed) + flags
        log(f"quantize {os.path.basename(out)}")
        with mock.patch.object(candidates, "smoothing_factors", jitter):
            QuantDiT.main(QuantDiT.build_parser().parse_args(argv + ["--out", out, "--overwrite"] + self._threads()))
        return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calib-seed", type=int, default=1)
    p.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.03])
    p.add_argument("--jitter-seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--results-dir", default=os.path.join("results", "bench"))
    threads.add_threads_arg(p)
    args = p.parse_args(argv)
    threads.set_threads(args.threads)
    torch.set_grad_enabled(False)
    bench = JitterBench(BUNDLED_CKPT, args.results_dir)
    flags = SETTINGS["fixed-bc"][2]
    assert flags[:len(N16)] == N16
    fp = bench.samples(None, 0, args.num_samples, 10)
    base = bench.samples(bench.jittered(0.0, 0, args.calib_seed, flags), 0, args.num_samples, 10)
    rows = [("none (the draw's own s)", [mean_psnr(base, fp)])]
    for eps in args.eps:
        rows.append((f"{eps:.0%}", [mean_psnr(bench.samples(bench.jittered(eps, j, args.calib_seed, flags), 0,
                                                            args.num_samples, 10), fp) for j in args.jitter_seeds]))
    print(f"W4A8 TAS alpha 0.5 + bias correction, calibration seed {args.calib_seed}; {args.num_samples} samples; "
          f"{machine()}")
    print(f"| jitter of s | PSNR vs FP per jitter seed {args.jitter_seeds} (dB) | spread max-min (dB) |")
    print("|---|---|---|")
    for what, values in rows:
        print(f"| {what} | {' / '.join(f'{v:.2f}' for v in values)} | {max(values) - min(values):.2f} |")


if __name__ == "__main__":
    main()
