"""The quality study's machinery (bench/quality.py, bench/pictures.py, bench/studies/approx_search.py): quantize,
sample and score the bundled digits DiT with caching, and the table helpers.

Everything runs in-process (QuantDiT.main, sample_merge_TAS.main, evaluator.evaluate). Quantized
checkpoints are cached in <results>/ckpt/ (keyed by the FP checkpoint's content and the flags),
sample batches in <results>/samples/ (the sampler's own resumable shards).
"""
import argparse
import hashlib
import json
import os
import platform
import shlex
import time

from ditas import threads  # noqa: F401  first: sets OpenMP's wait policy, read when torch loads
import numpy as np
import torch

from bundled.digits import BUNDLED_FLAGS, NUM_CLASSES

REF_NPZ = os.path.join("assets", "digits_ref.npz")
# (key, label, QuantDiT.py flags)
METHODS = {
    "rtn": ("RTN (no smoothing, no LoRA)", ["--smoothing", "none", "--lora-rank", "0"]),
    "fixed": ("TAS, fixed alpha 0.5, no LoRA", ["--smoothing", "fixed", "--alpha", "0.5", "--lora-rank", "0"]),
    "search": ("TAS, searched alpha, no LoRA", ["--smoothing", "search", "--lora-rank", "0"]),
    "ditas": ("DiTAS (searched alpha + LoRA r32)", ["--smoothing", "search"]),
    "token": ("DiTAS + per-token activations", ["--smoothing", "search", "--act-granularity", "token"]),
    # not default rows: adaLN linears quantized too (weight-only 8-bit); the one-pass approximate search
    "adaln": ("DiTAS + adaLN weight-only W8 (--quantize-adaln)", ["--smoothing", "search", "--quantize-adaln"]),
    "approx": ("DiTAS, approximate search", ["--smoothing", "search", "--search", "approx"]),
    "approx-token": ("DiTAS + per-token, approximate search",
                     ["--smoothing", "search", "--act-granularity", "token", "--search", "approx"]),
    # issue 30: the rank-32 branch in SVDQuant's order (SVD of W diag(s) before quantization, fed x/s in 16-bit)
    "svd": ("searched alpha + SVD-first branch r32 (--lora-order svd_first)",
            ["--smoothing", "search", "--lora-order", "svd_first"]),
    "svd-token": ("searched alpha + SVD-first branch r32 + per-token activations",
                  ["--smoothing", "search", "--lora-order", "svd_first", "--act-granularity", "token"]),
    # issue 30: block Hadamard rotation of proj's and fc2's inputs (--hadamard), alone and with the above
    "had": ("DiTAS + Hadamard (--hadamard)", ["--smoothing", "search", "--hadamard"]),
    "had-token": ("DiTAS + Hadamard + per-token", ["--smoothing", "search", "--hadamard", "--act-granularity", "token"]),
    "had-svd": ("searched alpha + SVD-first r32 + Hadamard",
                ["--smoothing", "search", "--lora-order", "svd_first", "--hadamard"]),
    "had-svd-token": ("searched alpha + SVD-first r32 + Hadamard + per-token",
                      ["--smoothing", "search", "--lora-order", "svd_first", "--hadamard", "--act-granularity", "token"]),
    # issue 30: QuantDiT's ditas defaults (smoothing select; fixed alpha with bias correction before it), and the
    # paper's search with the correction
    "select": ("smoothing select: none or TAS alpha 0.5, each + LoRA r32 + bias correction (QuantDiT's default)",
               ["--smoothing", "select", "--select-from", "none", "0.5", "--bias-correction"]),
    "default": ("TAS alpha 0.5 + LoRA r32 + bias correction (QuantDiT's default before smoothing select)",
                ["--smoothing", "fixed", "--alpha", "0.5", "--bias-correction"]),
    "ditas-bc": ("DiTAS (searched alpha + LoRA r32) + bias correction", ["--smoothing", "search", "--bias-correction"]),
    # rank 4: r (in + out) is 4.2 % of the bundled model's quantized weights, as rank 32 is of DiT-XL/2's (3.7 %)
    "r4": ("DiTAS with LoRA r4", ["--smoothing", "search", "--lora-rank", "4"]),
    "svd-r4": ("searched alpha + SVD-first r4", ["--smoothing", "search", "--lora-order", "svd_first", "--lora-rank", "4"]),
    "had-svd-token-r4": ("searched alpha + SVD-first r4 + Hadamard + per-token",
                         ["--smoothing", "search", "--lora-order", "svd_first", "--lora-rank", "4", "--hadamard",
                          "--act-granularity", "token"]),
}
# Every checkpoint cached before QuantDiT's ditas default took bias correction (issue 30) was computed without it: a
# row that does not ask for it pins this flag, which its cache key leaves out, so those caches keep their keys.
NO_BIAS_CORRECTION = "--no-bias-correction"
DEFAULT_METHODS = ["rtn", "fixed", "search", "ditas", "token"]
FULL = dict(num_samples=1000, steps=50)
QUICK = dict(num_samples=100, steps=10)
PSNR_CAP_DB = 80.0  # identical images: PSNR capped (uint8: the smallest non-zero MSE gives ~77 dB at 16x16x3)


def seeding_tag():
    """A short tag of how (global seed, index) maps to a sample's generator: part of the sample cache key."""
    from diffusion.sampling import SampleRNG
    probe = [float(SampleRNG(s, i).randn((1,))) for s in (0, 1, 7) for i in (0, 1, 999)]
    return hashlib.sha256(json.dumps(probe).encode()).hexdigest()[:6]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def file_digest(path, n=12):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


def model_flags(ckpt):
    flags = list(BUNDLED_FLAGS)
    flags[flags.index("--ckpt") + 1] = ckpt
    return flags


def parse_bits(spec):
    s = spec.upper()
    if not (s.startswith("W") and "A" in s):
        raise argparse.ArgumentTypeError(f"bits must look like W4A8, got {spec!r}")
    w, a = s[1:].split("A")
    return int(w), int(a)


class Bench:
    """Cached quantize / sample / score on one FP checkpoint."""

    def __init__(self, ckpt, results_dir="results/bench", cfg_scale=1.5, batch_size=100, calib_steps=None):
        self.ckpt = ckpt
        self.digest = file_digest(ckpt)
        self.results_dir = results_dir
        self.cfg_scale = cfg_scale
        self.batch_size = batch_size
        self.calib_steps = calib_steps
        self.timings = {}
        self._ref = self._extractor = self._classifier = None

    @staticmethod
    def _threads():
        """The caller's thread count for the scripts run in-process (each would otherwise take every core);
        not part of any cache key."""
        return ["--threads", str(torch.get_num_threads())]

    # ------------------------------------------------------------------ quantize
    def quant_argv(self, bits, scheme, method, steps, calib_seed=None):
        """QuantDiT.py's flags for one row; calib_seed None keeps QuantDiT's default --seed."""
        w, a = bits
        calib = self.calib_steps or steps
        seed = [] if calib_seed is None else ["--seed", str(calib_seed)]
        flags = METHODS[method][1]
        pin = [] if "--bias-correction" in flags else [NO_BIAS_CORRECTION]
        return (model_flags(self.ckpt) + ["--weight-bit", str(w), "--act-bit", str(a), "--scheme", scheme,
                                          "--num-sampling-steps", str(calib), "--no-preview", "--device", "cpu"]
                + seed + flags + pin)

    def checkpoint(self, bits, scheme, method, steps, calib_seed=None):
        """The quantized checkpoint directory (made by QuantDiT.main unless cached)."""
        import QuantDiT
        from quant.io.checkpoint import is_quantized_checkpoint
        argv = self.quant_argv(bits, scheme, method, steps, calib_seed)
        keyed = [a for a in argv if a != NO_BIAS_CORRECTION]  # the computation of every key cached before it existed
        key = hashlib.sha256(json.dumps([self.digest, keyed]).encode()).hexdigest()[:10]
        cs = "" if calib_seed is None else f"-cs{calib_seed}"
        name = f"W{bits[0]}A{bits[1]}-{scheme}-{method}-c{self.calib_steps or steps}{cs}-{key}"
        out = os.path.join(self.results_dir, "ckpt", name)
        if is_quantized_checkpoint(out):
            return out
        log(f"quantize {name}: QuantDiT.py {shlex.join(argv)}")
        t0 = time.time()
        QuantDiT.main(QuantDiT.build_parser().parse_args(argv + ["--out", out, "--overwrite"] + self._threads()))
        self.timings[f"quantize {name}"] = time.time() - t0
        return out

    # ------------------------------------------------------------------ sample
    def samples(self, qdir, seed, n, steps, backend="fake"):
        """uint8 (n, 16, 16, 3) samples (sample_merge_TAS.main; its shards make it resumable)."""
        import sample_merge_TAS
        source = ["--path", qdir] if qdir else model_flags(self.ckpt)
        tag = (os.path.basename(qdir) if qdir else f"fp-{self.digest}") + f"-s{seeding_tag()}"
        sample_dir = os.path.join(self.results_dir, "samples", tag)
        argv = source + ["--num-fid-samples", str(n), "--num-sampling-steps", str(steps), "--cfg-scale",
                         str(self.cfg_scale), "--global-seed", str(seed), "--sample-dir", sample_dir,
                         "--per-proc-batch-size", str(self.batch_size), "--device", "cpu"]
        if qdir:
            argv += ["--backend", backend]
        t0 = time.time()
        npz = sample_merge_TAS.main(sample_merge_TAS.build_parser().parse_args(argv + self._threads()))
        dt = time.time() - t0
        if dt > 1:
            self.timings[f"sample {tag} seed {seed}"] = dt
        return np.load(npz)["arr_0"]

    # ------------------------------------------------------------------ score
    def score_real(self, n, seed):
        """The metrics of n real digits drawn (without replacement) from the reference batch: the floor."""
        from bundled.classifier import label_accuracy
        from evaluator import evaluate
        self._load()
        idx = np.random.default_rng(seed).choice(len(self._ref), n, replace=False)
        with np.load(REF_NPZ) as f:
            labels = f["labels"][idx]
        images = self._ref[idx]
        m = evaluate(self._ref, images, self._extractor, progress=False)
        return {"fid": m["fid"], "is": m["inception_score"], "precision": m["precision"], "recall": m["recall"],
                "label_acc": label_accuracy(images, labels, self._classifier)}

    def _load(self):
        from bundled.classifier import load_classifier
        from evaluator import load_images, make_extractor
        if self._ref is None:
            self._ref = load_images(REF_NPZ)
            self._extractor = make_extractor("digits")
            self._classifier = load_classifier()

    def score(self, images, seed, fp_images=None):
        from bundled.classifier import label_accuracy
        from evaluator import evaluate
        from diffusion.sampling import sample_labels
        self._load()
        m = evaluate(self._ref, images, self._extractor, progress=False)
        out = {"fid": m["fid"], "is": m["inception_score"], "precision": m["precision"], "recall": m["recall"],
               "label_acc": label_accuracy(images, sample_labels(seed, len(images), NUM_CLASSES), self._classifier)}
        if fp_images is not None:
            out["psnr"] = mean_psnr(images, fp_images)
        return out


def mean_psnr(a, b):
    """Mean over samples of PSNR(a_i, b_i) in dB (uint8 images; identical pairs count as PSNR_CAP_DB)."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = (diff ** 2).reshape(len(a), -1).mean(1)
    psnr = np.where(mse > 0, 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12)), PSNR_CAP_DB)
    return float(np.minimum(psnr, PSNR_CAP_DB).mean())


def mean_std(values):
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt(values, digits=2, scale=1.0):
    if not values:
        return "-"
    m, s = mean_std([scale * x for x in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None without matplotlib (the bench plots are optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def machine():
    from bench.common import cpu_name
    return (f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}, {platform.system()}")
