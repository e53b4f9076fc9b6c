"""Quality study on the bundled digits DiT: what each part of DiTAS buys, at W8A8 and W4A8, per scheme.

    python bench/quality.py [--num-samples 1000 --steps 50 --seeds 0 1 2 --bits W8A8 W4A8 \
        --schemes ditas reference] [--quick]

Rows, for every bit width and scheme (the quantized rows all from QuantDiT.py's flags):

    FP                      the full-precision model
    RTN                     --smoothing none --lora-rank 0      (round-to-nearest, no smoothing)
    TAS alpha=0.5, no LoRA  --smoothing fixed --alpha 0.5 --lora-rank 0
    TAS searched, no LoRA   --smoothing search --lora-rank 0
    DiTAS                   --smoothing search (LoRA rank 32: the full method)
    DiTAS + per-token       ... --act-granularity token (a finer dynamic range than the paper's)

(the no-LoRA rows use --lora-rank 0 to isolate smoothing). Columns: FID-digits and IS-digits
(evaluator.evaluate, digits features, against assets/digits_ref.npz), the fraction the bundled
classifier assigns to the conditioning label, and the mean PSNR of each sample against the FP
sample from the same noise (same global seed and index). Every number is mean +- standard
deviation over the sampling seeds (--seeds), with the same quantized checkpoint.

Everything runs in this process (QuantDiT.main, sample_merge_TAS.main, evaluator.evaluate):
torch is imported once. Quantized checkpoints are cached in results/bench/ckpt/ (keyed by the
FP checkpoint's content and the flags) and sample batches in results/bench/samples/ (the
sampler's own resumable shards), so a rerun only computes what is missing. Writes
bench/results/quality.md and bench/results/quality.json.
"""
import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bundled.digits import BUNDLED_CKPT, BUNDLED_FLAGS, NUM_CLASSES  # noqa: E402

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
}
DEFAULT_METHODS = ["rtn", "fixed", "search", "ditas", "token"]
FULL = dict(num_samples=1000, steps=50)
QUICK = dict(num_samples=100, steps=10)
PSNR_CAP_DB = 80.0  # identical images: PSNR capped (uint8: the smallest non-zero MSE gives ~77 dB at 16x16x3)


def seeding_tag():
    """A short tag of how (global seed, index) maps to a sample's generator: part of the sample cache key."""
    import pipeline
    probe = [pipeline.sample_seed(s, i) % (1 << 64) for s in (0, 1, 7) for i in (0, 1, 999)]
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

    # ------------------------------------------------------------------ quantize
    def quant_argv(self, bits, scheme, method, steps):
        w, a = bits
        calib = self.calib_steps or steps
        return (model_flags(self.ckpt) + ["--weight-bit", str(w), "--act-bit", str(a), "--scheme", scheme,
                                          "--num-sampling-steps", str(calib), "--no-preview", "--device", "cpu"]
                + METHODS[method][1])

    def checkpoint(self, bits, scheme, method, steps):
        """The quantized checkpoint directory (made by QuantDiT.main unless cached)."""
        import QuantDiT
        from quant.checkpoint import is_quantized_checkpoint
        argv = self.quant_argv(bits, scheme, method, steps)
        key = hashlib.sha256(json.dumps([self.digest, argv]).encode()).hexdigest()[:10]
        name = f"W{bits[0]}A{bits[1]}-{scheme}-{method}-c{self.calib_steps or steps}-{key}"
        out = os.path.join(self.results_dir, "ckpt", name)
        if is_quantized_checkpoint(out):
            return out
        log(f"quantize {name}: QuantDiT.py {shlex.join(argv)}")
        t0 = time.time()
        QuantDiT.main(QuantDiT.build_parser().parse_args(argv + ["--out", out, "--overwrite"]))
        self.timings[f"quantize {name}"] = time.time() - t0
        return out

    # ------------------------------------------------------------------ sample
    def samples(self, qdir, seed, n, steps):
        """uint8 (n, 16, 16, 3) samples (sample_merge_TAS.main; its shards make it resumable)."""
        import sample_merge_TAS
        source = ["--path", qdir] if qdir else model_flags(self.ckpt)
        tag = (os.path.basename(qdir) if qdir else f"fp-{self.digest}") + f"-s{seeding_tag()}"
        sample_dir = os.path.join(self.results_dir, "samples", tag)
        argv = source + ["--num-fid-samples", str(n), "--num-sampling-steps", str(steps), "--cfg-scale",
                         str(self.cfg_scale), "--global-seed", str(seed), "--sample-dir", sample_dir,
                         "--per-proc-batch-size", str(self.batch_size), "--device", "cpu"]
        t0 = time.time()
        npz = sample_merge_TAS.main(sample_merge_TAS.build_parser().parse_args(argv))
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
        from pipeline import sample_labels
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


def machine():
    from bench.common import cpu_name
    return (f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}, {platform.system()}")


def run_rows(bench, settings, methods, seeds, n, steps, fp=True):
    """{row key: {"label", "bits", "scheme", "method", "ckpt", "per_seed": [metrics...]}} (FP first)."""
    rows = {"real": {"label": f"real digits ({n} drawn from the reference per seed)", "bits": None, "scheme": None,
                     "method": "real", "ckpt": None, "per_seed": [bench.score_real(n, s) for s in seeds]}}
    fp_images = {}
    for seed in seeds:
        fp_images[seed] = bench.samples(None, seed, n, steps)
    if fp:
        rows["FP"] = {"label": "FP", "bits": None, "scheme": None, "method": "fp", "ckpt": bench.ckpt,
                      "per_seed": [bench.score(fp_images[s], s) for s in seeds]}
        log(f"FP: {summary(rows['FP'])}")
    for bits, schemes in settings.items():
        for scheme in schemes:
            for method in methods:
                qdir = bench.checkpoint(bits, scheme, method, steps)
                per_seed = [bench.score(bench.samples(qdir, s, n, steps), s, fp_images[s]) for s in seeds]
                key = f"W{bits[0]}A{bits[1]} {scheme} {method}"
                rows[key] = {"label": METHODS[method][0], "bits": list(bits), "scheme": scheme, "method": method,
                             "ckpt": qdir, "per_seed": per_seed}
                log(f"{key}: {summary(rows[key])}")
    return rows


def summary(row):
    ps = row["per_seed"]
    parts = [f"FID {fmt([p['fid'] for p in ps])}", f"acc {fmt([p['label_acc'] for p in ps], 1, 100)}%"]
    if "psnr" in ps[0]:
        parts.append(f"PSNR {fmt([p['psnr'] for p in ps])}")
    return ", ".join(parts)


def calib_time(qdir):
    try:
        with open(os.path.join(qdir, "report.json")) as f:
            return json.load(f)["timings"].get("total_s")
    except (OSError, ValueError, KeyError):
        return None


def table(rows):
    lines = ["| setting | method | FID-digits ↓ | IS-digits ↑ | classified as label ↑ | PSNR vs FP (dB) ↑ | "
             "calibration (s) |", "|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        ps = r["per_seed"]
        setting = {"real": "data", "fp": "FP"}.get(r["method"]) or f"W{r['bits'][0]}A{r['bits'][1]} {r['scheme']}"
        ct = calib_time(r["ckpt"]) if r["bits"] is not None else None
        lines.append(f"| {setting} | {r['label']} | {fmt([p['fid'] for p in ps])} | {fmt([p['is'] for p in ps])} | "
                     f"{fmt([p['label_acc'] for p in ps], 1, 100)} % | "
                     f"{fmt([p['psnr'] for p in ps]) if 'psnr' in ps[0] else '-'} | "
                     f"{'-' if ct is None else f'{ct:.0f}'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=None, help=f"samples per row and seed "
                   f"(default {FULL['num_samples']}; --quick {QUICK['num_samples']})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"DDPM steps for sampling and calibration (default {FULL['steps']}; --quick {QUICK['steps']})")
    p.add_argument("--calib-steps", type=int, default=None,
                   help="calibration steps if different from --steps (the paper calibrates at the sampling steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds (global seed)")
    p.add_argument("--bits", type=parse_bits, nargs="+", default=[(8, 8), (4, 8)], help="e.g. W8A8 W4A8")
    p.add_argument("--schemes", nargs="+", choices=("ditas", "reference"), default=["ditas", "reference"])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    p.add_argument("--quick", action="store_true", help="the reduced setting: "
                   f"{QUICK['num_samples']} samples, {QUICK['steps']} steps (explicit flags win)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="sampling guidance (the paper's 1.5)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--ckpt", default=BUNDLED_CKPT, help="the FP digits DiT (default: the bundled asset)")
    p.add_argument("--results-dir", default=os.path.join("results", "bench"))
    p.add_argument("--out", default=os.path.join("bench", "results", "quality.md"))
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    n = args.num_samples or base["num_samples"]
    steps = args.steps or base["steps"]
    os.chdir(ROOT)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if not os.path.isfile(args.ckpt):
        sys.exit(f"error: {args.ckpt} not found (the bundled model; pass --ckpt results/train/last.pt while it "
                 f"trains)")
    t_start = time.time()
    bench = Bench(args.ckpt, args.results_dir, args.cfg_scale, args.batch_size, args.calib_steps)
    settings = {tuple(b): list(args.schemes) for b in args.bits}
    rows = run_rows(bench, settings, args.methods, args.seeds, n, steps)
    wall = time.time() - t_start

    command = "python bench/quality.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    calib = args.calib_steps or steps
    text = "\n".join([
        "# Quality study: what each part of DiTAS buys (bundled digits DiT-T/2)", "",
        f"Command: `{command}`", "",
        f"Model: `{args.ckpt}` (sha256 {bench.digest}…), {n} samples per row and seed, {steps} DDPM steps, "
        f"cfg {args.cfg_scale}, sampling seeds {' '.join(map(str, args.seeds))}; calibration: QuantDiT.py "
        f"defaults (16 labels, cfg 1.5, seed 1) at {calib} steps. "
        f"Machine: {machine()}. Wall time {wall / 60:.1f} min (cached stages excluded).", "",
        "Each cell: mean ± standard deviation over the sampling seeds (same quantized checkpoint). "
        "FID-digits / IS-digits: evaluator.evaluate with the bundled digit classifier's features against "
        f"the 1797 real digits (assets/digits_ref.npz); the first row, {n} real digits drawn from that batch, "
        "is the floor at this N. PSNR: per sample against the FP sample from the same noise and label, "
        f"averaged (identical images count as {PSNR_CAP_DB:g} dB). "
        "The no-LoRA rows use --lora-rank 0 to isolate smoothing; ditas quantizes activations per batch row "
        "and reference per tensor unless the row says per-token. Calibration (s): QuantDiT's total time "
        "for that checkpoint.", "",
        table(rows), "",
    ])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"command": command, "num_samples": n, "steps": steps, "calib_steps": calib,
                   "cfg_scale": args.cfg_scale, "seeds": args.seeds, "ckpt": args.ckpt, "ckpt_sha256": bench.digest,
                   "machine": machine(), "wall_s": wall, "timings": bench.timings, "rows": rows}, f, indent=1)
    print(text)
    for k, v in bench.timings.items():
        print(f"  {v:7.1f}s  {k}")
    return rows


if __name__ == "__main__":
    main()
