"""Inference speed and memory: FP fp32 / bf16, fake-quantized and integer W8A8 / W4A8 DiTs.

    python bench/inference.py                                 # bundled DiT-T/2, DiT-S/2, DiT-B/2 (256 px)
    python bench/inference.py --device cuda --models DiT-XL/2 --batches 1,8,32 --compile \
        --variants bf16,"int W8A8","int W8A8 per-channel r0","int W4A8","int W4A8 r0" --out bench/results/inference_cuda.md

One denoising step is one model forward (no CFG doubling; with CFG the batch doubles). For
each model and batch size the variants are timed round-robin (one forward of each per round,
`--reps` rounds after a warm-up), so load changes on a shared machine hit all of them alike;
the table gives the median ms per forward and images per second for a `--steps`-step sampler
(batch / (steps x forward)), and the speed-up over the bf16 FP model.

Variants (what sample_merge_TAS.py runs: quantized layers built, smoothing folded):
* fp32, bf16: the FP model in that dtype.
* fake W8A8 / W4A8: QuantLinear quantize-dequantize in float32 (the released code's kind).
* int W8A8 / W4A8: `--backend int --dtype bf16` (quant/nn/int_linear.py: the fused AVX512-VNNI kernel
  where the CPU has it, which keeps 4-bit codes two per byte, else int8 GEMMs via torch._int_mm with
  the 4-bit codes unpacked once at load); everything that is not a quantized linear
  (attention, norms, adaLN, embedders) runs in bf16, like the bf16 baseline.
The quantized models use QuantDiT.py's defaults (ditas scheme, group 128 along K, row-wise
activation ranges, LoRA rank 32), W8A8 with one weight scale per output channel (group 0), and,
to show what the LoRA branch costs, variants without it (r0).
Quantization parameters come from a fixed alpha (0.5) and one forward's activation ranges, with
a single LoRA iteration: timing does not depend on calibration quality. Random weights for the
DiT-S/2 and DiT-B/2 shapes, the bundled checkpoint for DiT-T/2.

Memory: 'weights MB' is the bytes of every tensor the variant's modules keep, each storage once: parameters,
buffers (persistent or not) and tensors in plain attributes (int variants: the
prepared GEMM operands (8-bit: codes and the int8 operand; 4-bit on the fused kernel: the nibbles once,
half a byte per weight), scales, zero points, group sums, LoRA); 'peak extra MB' is the rise of the peak
RSS (VmHWM, reset first) or of CUDA's peak allocation during one forward: activations and temporaries.

Writes bench/results/inference.md (and .json).
"""
import argparse
import copy
import json
import os
import platform
import sys

from ditas import threads  # noqa: F401  first: sets OpenMP's wait policy, read when torch loads
import torch
from models import DiT_models
from quant.calibration.driver import collect_tas
from quant.quant_config import QuantConfig
from quant.method.layers import quantizable_layers
from quant.method.fold import fold_smoothing
from quant.nn.int_linear import to_int_backend
from quant.search.candidates import quantize_linear
from bench.common import ROOT, cpu_name, write_report
from bench.measure import MB, model_bytes, peak_extra_mb, time_round_robin

BUNDLED = os.path.join(ROOT, "assets", "dit_t2_digits16.safetensors")
# label -> (weight_bit, group_size or None, LoRA rank, backend)
QUANT_VARIANTS = {
    "fake W8A8": (8, 128, 32, "fake"),
    "fake W4A8": (4, 128, 32, "fake"),
    "int W8A8": (8, 128, 32, "int"),
    "int W8A8 per-channel": (8, None, 32, "int"),
    "int W8A8 per-channel r0": (8, None, 0, "int"),
    "int W4A8": (4, 128, 32, "int"),
    "int W4A8 r0": (4, 128, 0, "int"),
}
ALL_VARIANTS = ("fp32", "bf16", *QUANT_VARIANTS)


def build_fp(spec, image_size, seed=0):
    """(model, input_size, in_channels, num_classes) for 'bundled' or a DiT_models name (random weights)."""
    torch.manual_seed(seed)
    if spec == "bundled":
        from download import find_model, load_model_state
        model = DiT_models["DiT-T/2"](input_size=16, in_channels=3, num_classes=10)
        load_model_state(model, find_model(BUNDLED), BUNDLED)
        return model.eval(), 16, 3, 10
    size = image_size // 8
    model = DiT_models[spec](input_size=size, in_channels=4, num_classes=1000)
    with torch.no_grad():  # adaLN-Zero and the final layer start at 0: give them weights
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer"):
                p.normal_(0, 0.02)
    return model.eval(), size, 4, 1000


def make_inputs(batch, size, channels, num_classes, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x.to(device), t.to(device), y.to(device)


@torch.no_grad()
def quantize_fixed(fp, weight_bit, group_size, rank, inputs):
    """A folded quantized copy of fp: QuantDiT's layer types with alpha 0.5 from one forward's ranges."""
    cfg = QuantConfig(weight_bit=weight_bit, group_size=group_size, lora_rank=rank, smoothing="fixed",
                      lora_iters=1)
    model = copy.deepcopy(fp)
    layers = quantizable_layers(model)
    absmax = collect_tas(layers, lambda: model(*inputs))
    for name, lin in layers.items():
        ql = quantize_linear(lin, cfg.alpha, absmax[name], cfg.weight_cfg(), cfg.act_cfg(),
                                    lora_rank=cfg.lora_rank, lora_iters=cfg.lora_iters)
        model.set_submodule(name, ql)
    return fold_smoothing(model).eval()


def build_variants(fp, names, inputs, group_size=128, compile_=False):
    """{name: (model, input dtype)}; group_size replaces the variants' group of 128; compile_: also
    torch.compile'd bf16 and int variants ("... +compile")."""
    out = {}
    for name in names:
        if name == "fp32":
            out[name] = (fp, torch.float32)
        elif name == "bf16":
            out[name] = (copy.deepcopy(fp).bfloat16(), torch.bfloat16)
        else:
            bits, group, rank, backend = QUANT_VARIANTS[name]
            q = quantize_fixed(fp, bits, group and group_size, rank, inputs)
            if backend == "int":  # IntLinear keeps its integer operands; the rest of the model goes bf16
                out[name] = (to_int_backend(q).bfloat16(), torch.bfloat16)
            else:
                out[name] = (q, torch.float32)
    if compile_:
        for name in [n for n in out if n == "bf16" or n.startswith("int ")]:
            out[f"{name} +compile"] = (torch.compile(out[name][0]), out[name][1])
    return out


def bench_model(spec, args):
    fp, size, channels, ncls = build_fp(spec, args.image_size)
    fp = fp.to(args.device)
    calib = make_inputs(4, size, channels, ncls, seed=1, device=args.device)
    variants = build_variants(fp, args.variants, calib, args.group_size, args.compile)
    rows = []
    for batch in args.batches:
        x, t, y = make_inputs(batch, size, channels, ncls, device=args.device)
        cases = {}
        for name, (model, dtype) in variants.items():
            xi = x.to(dtype)
            cases[name] = (lambda m=model, xi=xi: m(xi, t, y))
        with torch.inference_mode():
            peaks = {name: peak_extra_mb(fn, args.device) for name, fn in cases.items()}
            times = time_round_robin(cases, args.reps, args.device)
        base = times["bf16"][len(times["bf16"]) // 2] if "bf16" in times else None
        for name in cases:
            med = times[name][len(times[name]) // 2]
            rows.append({"model": "DiT-T/2 (bundled)" if spec == "bundled" else spec, "tokens": (size // 2) ** 2,
                         "batch": batch, "variant": name, "ms": med * 1e3, "ms_min": times[name][0] * 1e3,
                         "images_per_s": batch / (args.steps * med), "vs_bf16": None if base is None else base / med,
                         "weights_mb": model_bytes(variants[name][0]) / MB, "peak_extra_mb": peaks[name]})
            print(f"  {rows[-1]['model']} b{batch} {name}: {med * 1e3:.1f} ms"
                  + ("" if base is None else f", {base / med:.2f}x bf16"), flush=True)
    return rows


def gpu_or_cpu(device):
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), host {cpu_name()}"
    return f"{cpu_name()}, {os.cpu_count()} cores"


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def write_results(rows, args, out):
    lines = ["# Inference speed and memory: FP vs fake vs integer quantized DiT", "",
             f"`python bench/inference.py {' '.join(sys.argv[1:])}`".replace(" `", "`"), "",
             f"Machine: {gpu_or_cpu(args.device)}, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads), Python {platform.python_version()}. "
             f"One forward = one denoising step without CFG; images/s = batch / ({args.steps} x forward); "
             f"median of {args.reps} round-robin rounds. 'x bf16' is the bf16 FP model's time over the variant's.",
             "", "| model | tokens | batch | variant | ms / forward | images/s | x bf16 | weights MB | peak extra MB |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tokens']} | {r['batch']} | {r['variant']} | {r['ms']:.1f} | "
                     f"{r['images_per_s']:.3f} | {fmt(r['vs_bf16'], '.2f')} | {r['weights_mb']:.1f} | "
                     f"{fmt(r['peak_extra_mb'], '.0f')} |")
    lines += ["", "Quantized variants: QuantDiT.py defaults (ditas scheme, group 128 along K, row activation ranges, "
              "LoRA rank 32); 'per-channel' is --group-size 0, 'r0' is --lora-rank 0. Int variants run every non-quantized op in bf16."]
    write_report(out, lines)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"argv": sys.argv[1:], "rows": rows}, f, indent=1)


def parse_list(text, conv=str):
    return [conv(v.strip()) for v in text.split(",") if v.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="bundled,DiT-S/2,DiT-B/2",
                    help="comma list: 'bundled' and/or DiT_models names (random weights)")
    ap.add_argument("--image-size", type=int, default=256, help="image size of the random-weight models")
    ap.add_argument("--batches", default="1,8,16", help="comma list of batch sizes")
    ap.add_argument("--variants", default=",".join(ALL_VARIANTS), help=f"comma list of {ALL_VARIANTS}")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps for images/s")
    ap.add_argument("--group-size", type=int, default=128, help="weight group of the grouped variants")
    ap.add_argument("--reps", type=int, default=5, help="round-robin timing rounds")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: timed with synchronization, peak memory = CUDA's peak allocation; the int variants "
                         "run the Triton kernels (kernel auto)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd bf16 and int variants")
    threads.add_threads_arg(ap)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "inference.md"))
    args = ap.parse_args()
    args.batches = parse_list(args.batches, int)
    args.variants = parse_list(args.variants)
    bad = [v for v in args.variants if v not in ALL_VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {ALL_VARIANTS}")
    models = parse_list(args.models)
    bad = [m for m in models if m != "bundled" and m not in DiT_models]
    if bad:
        ap.error(f"unknown model(s) {bad}")
    if "bundled" in models and not os.path.exists(BUNDLED):
        ap.error(f"{BUNDLED} not found")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA GPU is visible")
    threads.set_threads(args.threads)
    rows = []
    for spec in models:
        print(f"{spec}:", flush=True)
        rows += bench_model(spec, args)
    write_results(rows, args, args.out)


if __name__ == "__main__":
    main()
