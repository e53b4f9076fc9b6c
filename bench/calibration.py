"""Calibration cost: QuantDiT's quantize_dit vs an emulation of the released procedure.

    python bench/calibration.py                       # bundled DiT-T/2, 64 tokens, 20 steps, batch 32 (16 labels x CFG)
    python bench/calibration.py --model DiT-S/2 --steps 10 --released-search naive \
        --out bench/results/calibration_s2.md        # random DiT-S/2 weights, 64 tokens

Both run on the same model, sampler, steps, seed, labels and QuantConfig (reference scheme by
default), each in its own subprocess (so peak memory is its own), single-threaded:

* ours: quant.calibration.driver.quantize_dit -- one FP sampling loop for the TAS statistics, one
  more in which every layer's AlphaSearch scores all candidates on each step's input as it
  streams by (plus the round-to-nearest baseline search of the report); with the candidate
  products in float32 (`ours-fp32`) and in bfloat16 (`ours-bf16`, QuantConfig.search_dtype), and
  with bf16 products scoring every 2nd (or 4th) token row only (`ours-bf16-rows2`, an approximation:
  QuantConfig.search_row_stride).
* ours-defaults: QuantDiT.py's ditas scheme with --smoothing search --no-bias-correction (its default until the
  default became alpha 0.5 with bias correction, docs/METHOD.md §15; --scheme is the others'): pass 1 gathers the
  approximate search's statistics, every alpha's candidate is fitted (subspace SVD) and ranked by its
  predicted loss, the pass 2 scores the 2 best exactly (on the fused integer kernel on x86 CPUs).
* released (docs/METHOD.md §9, emulated): one TAS loop, then for EACH layer one full FP sampling
  loop whose forward pre-hook keeps that layer's input at every step in memory, then the 21-point
  search on the captured list, with our numerics (the same AlphaSearch, so the alphas compare).
  `--released-search naive` (default) scores every candidate with a direct fake-quantized product
  as the released code does; `same` uses our AlphaSearch.update (the loop structure's cost alone).

Reported: wall and CPU seconds, full sampling loops (forward calls / steps), peak RSS (ru_maxrss) and its
growth after the model was built, and how many layers chose the released emulation's alpha (direct
search, float32: the released numerics). Writes bench/results/calibration.md.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

from ditas import threads  # first: sets OpenMP's wait policy, read when torch loads
import torch
from config import calib_labels
from models import DiT_models
from quant import fp_calibration_loop
from quant.calibration.driver import collect_tas, quantize_dit
from quant.quant_config import QuantConfig, field_default
from quant.method.layers import quantizable_layers
from quant.nn.qlinear import QuantLinear
from quant.search.candidates import AlphaSearch
from bench.common import ROOT, cpu_name, write_report
from bench.measure import status_kb

BUNDLED = os.path.join(ROOT, "assets", "dit_t2_digits16.safetensors")


def build_model(args):
    torch.manual_seed(args.seed)  # the constructor's init draws from the global RNG: same weights in every process
    model = DiT_models[args.model](input_size=args.input_size, in_channels=args.in_channels,
                                   num_classes=args.num_classes)
    if args.ckpt:
        from download import find_model, load_model_state
        load_model_state(model, find_model(args.ckpt), args.ckpt)
    else:  # random weights; adaLN-Zero and the final layer start at 0: give them weights too
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adaLN_modulation" in name or name.startswith("final_layer"):
                    p.normal_(0, 0.02)
    return model.eval()


# our methods: (search dtype, search row stride)
def quant_config(args, search_dtype="fp32", row_stride=1, scheme=None):
    """QuantDiT's config for the bench's flags (the scheme's defaults from quant/quant_config.py), with the paper's
    alpha search and no bias correction: the procedure the released one is timed against."""
    return QuantConfig(scheme=scheme or args.scheme, weight_bit=args.weight_bit, act_bit=args.act_bit,
                       group_size=args.group_size, lora_rank=args.lora_rank, lora_iters=args.lora_iters,
                       search_dtype=search_dtype, search_row_stride=row_stride, smoothing="search",
                       bias_correction=False)


OURS = {"ours-defaults": lambda args: quant_config(args, scheme="ditas"),  # the ditas scheme's search settings
        "ours-fp32": quant_config, "ours-bf16": lambda args: quant_config(args, "bf16"),
        "ours-bf16-rows2": lambda args: quant_config(args, "bf16", 2),
        "ours-bf16-rows4": lambda args: quant_config(args, "bf16", 4)}


def child(args):
    """Run one method; write its measurements as JSON."""
    torch.set_grad_enabled(False)
    threads.set_threads(args.threads)
    model = build_model(args)
    labels = calib_labels(args.num_classes)[:args.labels]
    forwards = [0]
    model.x_embedder.register_forward_pre_hook(lambda m, i: forwards.__setitem__(0, forwards[0] + 1))
    loop = fp_calibration_loop(model, labels, seed=args.seed, steps=args.steps, clip_denoised=args.clip)

    cfg = OURS.get(args.child, quant_config)(args)
    rss0 = status_kb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    phases = {}
    if args.child.startswith("ours"):
        report = quantize_dit(model, cfg, loop, progress=False)
        alphas = {n: r["alpha"] for n, r in report["layers"].items()}
        phases = report["timings"]
    else:
        layers = quantizable_layers(model)
        wcfg, acfg = cfg.weight_cfg(), cfg.act_cfg()
        tp = time.perf_counter()
        absmax = collect_tas(layers, loop)
        phases["tas_statistics_s"] = time.perf_counter() - tp
        phases.update(capture_loops_s=0.0, prepare_candidates_s=0.0, alpha_search_s=0.0)
        chosen, alphas, peak_capture = {}, {}, 0
        for name, lin in layers.items():
            captured = []
            handle = lin.register_forward_pre_hook(lambda m, i: captured.append(i[0].detach().clone()))
            tp = time.perf_counter()
            try:
                loop()
            finally:
                handle.remove()
            phases["capture_loops_s"] += time.perf_counter() - tp
            peak_capture = max(peak_capture, sum(x.numel() * x.element_size() for x in captured))
            tp = time.perf_counter()
            search = AlphaSearch.of_layer(lin.weight, lin.bias, absmax[name], cfg.alphas(), wcfg, acfg,
                                          lora_rank=cfg.lora_rank, lora_iters=cfg.lora_iters, svd=cfg.svd,
                                          max_steps=cfg.search_steps, matmul_dtype=cfg.search_dtype,
                                          impl="naive" if args.child == "released-naive" else "fast")
            phases["prepare_candidates_s"] += time.perf_counter() - tp
            tp = time.perf_counter()
            for x in captured:
                search.update(x)
            phases["alpha_search_s"] += time.perf_counter() - tp
            best = search.best()
            chosen[name], alphas[name] = best, best.alpha
            del captured, search
        for name, lq in chosen.items():
            model.set_submodule(name, QuantLinear.from_search(lq, acfg))
        phases["captured_bytes_max"] = peak_capture
    out = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
           "forwards": forwards[0], "loops": forwards[0] / args.steps,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_after_build_mb": rss0 / 1024, "alphas": alphas, "phases": phases, "scheme": cfg.scheme,
           "config": str(cfg)}
    with open(args.json, "w") as f:
        json.dump(out, f)


def run_child(method, argv, tmp):
    path = os.path.join(tmp, f"{method}.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", method, "--json", path]
    print(f"running {method} ...", flush=True)
    proc = subprocess.run(cmd, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{method} failed (exit {proc.returncode})")
    with open(path) as f:
        return json.load(f)


NAMES = {"ours-defaults": "ours, QuantDiT.py's defaults (ditas scheme: shortlist search, subspace fits)",
         "ours-fp32": "ours, fp32 search (quantize_dit: 2 streaming loops)",
         "ours-bf16": "ours, bf16 candidate products (--search-dtype bf16)",
         "ours-bf16-rows2": "ours, bf16, every 2nd row scored (--search-dtype bf16 --search-row-stride 2)",
         "ours-bf16-rows4": "ours, bf16, every 4th row scored (--search-dtype bf16 --search-row-stride 4)",
         "released-naive": "released, emulated: 1 + 1/layer loops, captured inputs, direct search",
         "released-same": "released, emulated, with our fp32 search kernel"}


def fmt_table(results):
    ref = results.get("released-naive") or results.get("released-same")
    n_layers = len(ref["alphas"])
    rows = ["| method | wall s | CPU s | full sampling loops | peak RSS MB | RSS growth MB | same alpha as released |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for method, r in results.items():
        same = sum(r["alphas"][k] == ref["alphas"][k] for k in ref["alphas"])
        same = (f"{same}/{n_layers} ({100 * same / n_layers:.0f}%)" if r.get("scheme") == ref.get("scheme")
                else f"n/a ({r.get('scheme')} scheme)")
        rows.append(f"| {NAMES[method]} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['loops']:g} | "
                    f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['rss_after_build_mb']:.0f} | {same} |")
    rows += ["", "| released / ours | wall | CPU | loops | peak RSS growth |", "|---|---:|---:|---:|---:|"]
    for rel in ("released-naive", "released-same"):
        for ours in OURS:
            if rel not in results or ours not in results:
                continue
            r, o = results[rel], results[ours]
            grow = (r["peak_rss_mb"] - r["rss_after_build_mb"]) / max(o["peak_rss_mb"] - o["rss_after_build_mb"], 1)
            rows.append(f"| {rel} / {ours} | **{r['wall_s'] / o['wall_s']:.1f}x** | **{r['cpu_s'] / o['cpu_s']:.1f}x** | "
                        f"{r['loops'] / o['loops']:.1f}x | {grow:.2f}x |")
    rows += ["", "Phases (wall seconds):", "", "| method | " + " | ".join(
        ["TAS loop", "capture loops", "prepare (LoRA fits)", "alpha search (incl. ours' FP loop)",
         "build layers"]) + " |", "|---|---:|---:|---:|---:|---:|"]
    for method, r in results.items():
        p = r["phases"]
        rows.append(f"| {method} | {p.get('tas_statistics_s', 0):.1f} | {p.get('capture_loops_s', 0):.1f} | "
                    f"{p.get('prepare_candidates_s', 0):.1f} | {p.get('alpha_search_s', 0):.1f} | "
                    f"{p.get('build_layers_s', 0):.1f} |")
    return rows


def _ours_list(text):
    bad = [m for m in text.split(",") if f"ours-{m}" not in OURS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown setting(s) {bad}")
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the bundled DiT-T/2 if present, else DiT-S/2")
    ap.add_argument("--input-size", type=int, default=16, help="latent / pixel side (16 -> 64 tokens at /2)")
    ap.add_argument("--in-channels", type=int, default=None)
    ap.add_argument("--num-classes", type=int, default=None)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--labels", type=int, default=16, help="calibration labels (batch = 2x with CFG)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scheme", choices=("reference", "ditas"), default="reference")
    ap.add_argument("--weight-bit", type=int, default=4)
    ap.add_argument("--act-bit", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=field_default("group_size"))
    ap.add_argument("--lora-rank", type=int, default=field_default("lora_rank"))
    ap.add_argument("--lora-iters", type=int, default=field_default("lora_iters"))
    ap.add_argument("--ours", default="fp32,bf16,bf16-rows2", type=_ours_list,
                    help=f"comma list of our settings: {', '.join(m[5:] for m in OURS)}")
    ap.add_argument("--released-search", choices=("naive", "same", "both"), default="both")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "calibration.md"))
    ap.add_argument("--threads", type=int, default=1, help="threads of each measured process (single-threaded)")
    ap.add_argument("--child", choices=tuple(NAMES), help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        if os.path.exists(BUNDLED) and args.ckpt is None:
            args.model, args.ckpt = "DiT-T/2", BUNDLED
            args.in_channels = args.in_channels or 3
            args.num_classes = args.num_classes or 10
        else:
            args.model = "DiT-S/2"
    args.in_channels = args.in_channels or 4
    args.num_classes = args.num_classes or 1000
    args.clip = args.in_channels == 3  # pixel-space models clip x0 like QuantDiT.py does for --vae none
    if args.child:
        return child(args)
    argv = [a for a in sys.argv[1:]]
    argv += ["--model", args.model, "--in-channels", str(args.in_channels), "--num-classes", str(args.num_classes)]
    if args.ckpt:
        argv += ["--ckpt", args.ckpt]
    methods = [f"ours-{m}" for m in args.ours.split(",")]
    methods += {"naive": ["released-naive"], "same": ["released-same"],
                "both": ["released-naive", "released-same"]}[args.released_search]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            results[m] = run_child(m, argv, tmp)
            print(f"  {m}: {results[m]['wall_s']:.1f}s wall, {results[m]['loops']:g} loops", flush=True)
    cfg = quant_config(args)
    n_layers = len(next(iter(results.values()))["alphas"])
    setting = (f"{args.model}{' (' + os.path.relpath(args.ckpt, ROOT) + ')' if args.ckpt else ' (random weights)'}, "
               f"input {args.input_size}x{args.input_size}x{args.in_channels} "
               f"({(args.input_size // int(args.model.rsplit('/', 1)[1])) ** 2} tokens), {n_layers} layers, "
               f"{args.steps} DDPM steps, {args.labels} labels x CFG = batch {2 * args.labels}, seed {args.seed}; "
               f"{cfg}")
    doc = ["# Calibration cost: ours vs the released procedure (emulated)", "",
           f"`python bench/calibration.py {' '.join(sys.argv[1:])}`".replace("` ", "`").rstrip(), "",
           f"Setting: {setting}.", "",
           *[f"- {m}: {r['config']}" for m, r in results.items() if m.startswith("ours") and r["config"] != str(cfg)],
           "",
           f"Machine: {cpu_name()}, {os.cpu_count()} cores (each method single-threaded, in its own "
           f"subprocess; the machine was shared, so CPU seconds are the steadier measure); "
           f"torch {torch.__version__}, Python {platform.python_version()}.", "",
           *fmt_table(results), "",
           "Loops: model forward calls / steps (a preview loop is not counted for either). RSS growth: peak RSS "
           "minus RSS after the model was built (the released emulation keeps every step's input of one layer).",
           "'same alpha as released': layers whose alpha equals the one the released emulation with the "
           "direct float32 search chose (the released numerics)."]
    write_report(args.out, doc)


if __name__ == "__main__":
    main()
