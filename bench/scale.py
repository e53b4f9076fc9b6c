"""QuantDiT.py end to end on a random DiT-XL/2 at a few tokens, and its peak memory projected to 256 and 1024 tokens.

    python bench/scale.py                      # DiT-XL/2, 32 px (4x4 latent: 4 tokens), 10 steps, both schemes (~1 h)
    python bench/scale.py --model DiT-S/2 --steps 2 --schemes reference --threads 1    # a quick check
    python bench/scale.py --extra "--calib-memory-gb 4" --device cuda
    python bench/scale.py --schemes ditas --nproc 2 --threads 1 --no-probe --extra=--calib-chunks=2 \
        --out bench/results/scale_ranks_chunks.md
    python bench/scale.py --project --out bench/results/calib_memory.md   # GPU peaks from the formulas, no run

Each scheme: one `QuantDiT.py --ckpt FILE --vae mse --no-preview` subprocess (no VAE is loaded), QuantDiT's defaults
otherwise, on a seeded random checkpoint cached in --cache (adaLN and the final layer N(0, 0.02), not adaLN-Zero's
degenerate zeros), or `--nproc N` processes under launch.py: its wall and CPU time (the processes together) and
peak RSS (ru_maxrss, os.wait4: the largest process), and its report.json. Projected to the
paper's calibration batch (16 labels x 2 for guidance = 32 rows of tokens) at 256 and 512 px (256 and 1024 tokens);
the probe checks the activation model. The projection is per memory: on CUDA the device's (FP model, the search
state QuantDiT plans on the device, activations) against the run's torch.cuda.max_memory_allocated, and the
per-step ranges kept in host memory apart; on the CPU all of it against the peak RSS. Writes
bench/results/scale.md and .json (everything); each run's output goes to stderr and to a log next to its QuantDiT
output directory. --project runs nothing: the projected GPU peak of calibration with QuantDiT's defaults (plus
--extra) at 256 and 512 px for --project-steps.
"""
import ctypes
import gc
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import threads  # noqa: E402  (before torch: sets OpenMP's wait policy, read when torch loads)
import torch  # noqa: E402
import cli  # noqa: E402
from models import DiT_models, get_2d_sincos_pos_embed  # noqa: E402
from quant.budget import GIB as BUDGET_GIB, by_memory, layer_state_parts, plan_groups, transient_bytes  # noqa: E402
from quant.budget import workspace_bytes  # noqa: E402
from config import calib_set  # noqa: E402
from quant.errors import UserError  # noqa: E402
from quant.feed import LoopShape  # noqa: E402
from quant.layers import BLOCK_LAYERS, quantizable_layers  # noqa: E402
from bench.common import cpu_name, stolen_seconds, stolen_share, write_report  # noqa: E402

GIB, MIB, F32 = 2 ** 30, 2 ** 20, 4
CALIB_ROWS = 32  # 16 calibration labels x 2 (classifier-free guidance)
PROJECT = {256: 32, 512: 64}  # image px -> latent side


def _rel(path):
    """path relative to the repository when inside it (the commands run there), else absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


# ---------------------------------------------------------------- the random checkpoint and one QuantDiT run

def random_model(name, latent, seed):
    """DiT `name` on a latent x latent x 4 input, seeded; adaLN and the final layer N(0, 0.02) instead of zeros."""
    torch.manual_seed(seed)
    model = DiT_models[name](input_size=latent, in_channels=4, num_classes=1000)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adaLN_modulation" in n or n.startswith("final_layer"):
                p.normal_(0, 0.02, generator=gen)
    return model.eval()


def random_checkpoint(args, latent):
    """The cached state dict file of random_model (built and saved once per model, latent and seed)."""
    path = os.path.join(args.cache, f"{args.model.replace('/', '-')}-{latent}x{latent}-seed{args.seed}.pt")
    if not os.path.isfile(path):
        print(f"building {_rel(path)} ...", file=sys.stderr, flush=True)
        os.makedirs(args.cache, exist_ok=True)
        torch.save(random_model(args.model, latent, args.seed).state_dict(), path + ".part")
        os.replace(path + ".part", path)
    return path


def run_quantdit(cmd, out_dir):
    """Run cmd, its output teed to our stderr and out_dir.log: {wall_s, cpu_s, peak_rss_bytes, stolen_share, exit,
    log, report} (stolen_share: the machine's CPU time its host took meanwhile, bench.common.stolen_seconds)."""
    t0, stolen0 = time.perf_counter(), stolen_seconds()
    with open(out_dir + ".log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            log.write(chunk)
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage
    proc.stdout.close()
    proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait for it again
    report, path = None, os.path.join(out_dir, "report.json")
    if code == 0 and os.path.isfile(path):
        with open(path) as f:
            report = json.load(f)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "stolen_share": stolen_share(stolen0, wall), "exit": code, "log": _rel(out_dir + ".log"), "report": report}


# ---------------------------------------------------------------- the memory model

def live_widths(D, H):
    """Float32 widths live at once per token row in one block forward (no grad): the peak, and at each quantized
    layer's input. Attention: the residual x, modulated h, qkv (3D), SDPA's output (its layout makes proj's input
    a view), proj's output: 7D. MLP: the block's input (its caller holds it), x after attention, h, fc1's and
    GELU's outputs: 3D + 2H. At fc2's input fc1's output is already freed."""
    return max(7 * D, 3 * D + 2 * H), {"attn.qkv": 2 * D, "attn.proj": 6 * D, "mlp.fc1": 3 * D, "mlp.fc2": 3 * D + H}


def meta_model(name, latent):
    with torch.device("meta"):
        return DiT_models[name](input_size=latent, in_channels=4, num_classes=1000)


def activation_bytes(model, rows, cfg=None, device_type="cpu"):
    """(bytes, where) of the activation working set at `rows` token rows (cfg None: an FP forward): the larger of one
    block forward's peak and, at each quantized layer's input, what is live there plus the search's per-step
    workspace for that layer (quant/budget.py's workspace_bytes, freed after the layer's step)."""
    shapes = {n: tuple(model.blocks[0].get_submodule(n).weight.shape) for n in BLOCK_LAYERS}
    peak, at = live_widths(shapes["attn.qkv"][1], shapes["mlp.fc1"][0])
    best, where = F32 * rows * peak, "block forward"
    for name in BLOCK_LAYERS if cfg is not None else ():
        ws = workspace_bytes(*shapes[name], rows, cfg, device_type)
        if F32 * rows * at[name] + ws > best:
            best, where = F32 * rows * at[name] + ws, f"{name} search"
    return best, where


def planned_state(model, cfg, device_type, loop, budget_bytes, chunks=1):
    """(device bytes, host bytes) of the largest layer group's search state that one QuantDiT process plans
    (quant/budget.py; tests/test_budget.py holds these formulas to the bytes held): the group's states plus
    one layer's transient candidates (the shortlist), on the device; its per-step ranges, on the host."""
    shapes = {n: tuple(lin.weight.shape) for n, lin in quantizable_layers(model).items()}
    groups, _ = plan_groups(shapes, cfg, budget_bytes, device_type, statistic_slots=chunks, loop=loop)
    transient = max(transient_bytes(o, i, cfg) for o, i in shapes.values())
    held = []
    for group in groups:
        mem = [by_memory(layer_state_parts(*shapes[n], cfg, device_type, chunks, loop), device_type) for n in group]
        held.append((transient + sum(m["device"] for m in mem), sum(m["host"] for m in mem)))
    return max(held)


def calib_batch(q):
    """(rows, chunks) of QuantDiT's calibration batch for its parsed flags q (config.calib_set: its defaults;
    ImageNet classes), rows = samples x 2 for guidance."""
    return 2 * len(calib_set(1000, q.calib_labels, q.calib_samples)), q.calib_chunks


def project(model_name, cfg, device_type, px, latent, steps, budget_bytes, chunks=1, rows=CALIB_ROWS):
    """One projected row: FP model, the planned search state (device, host), activations (one chunk's forward),
    the device's peak."""
    model = meta_model(model_name, latent)
    tokens = (latent // model.patch_size) ** 2
    loop = LoopShape(steps, rows // chunks, tokens)
    state, host = planned_state(model, cfg, device_type, loop, budget_bytes, chunks)
    act, where = activation_bytes(model, rows // chunks * tokens, cfg, device_type)
    fp = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"px": px, "tokens": tokens, "steps": steps, "model": fp, "state": state, "host": host,
            "activations": act, "where": where, "load": 2 * fp, "projected": fp + state + act}


def projection(args, runs, qargs, run_latent):
    """One row per scheme and size: model, planned state, activations, projected peak, load peak, and the run's
    measured peak in the same memory: torch.cuda.max_memory_allocated on CUDA, the peak RSS on the CPU."""
    rows = []
    for scheme, run in runs.items():
        cal = (run["report"] or {}).get("calibration") or {}
        cuda = str(cal.get("device", args.device)).startswith("cuda")
        q = qargs[scheme]
        for px, latent in [(args.image_size, run_latent), *PROJECT.items()]:
            cfg = quant_config(q)
            rows_, chunks = calib_batch(q)
            row = project(args.model, cfg, "cuda" if cuda else "cpu", px, latent, args.steps,
                          round(q.calib_memory_gb * BUDGET_GIB), chunks, rows_)
            here = latent == run_latent
            row.update(scheme=scheme, measured_as="CUDA max allocated" if cuda else "peak RSS",
                       measured=(cal.get("peak_cuda_bytes") if cuda else run["peak_rss_bytes"]) if here else None)
            rows.append(row)
    return rows


def quant_config(qargs):
    import QuantDiT
    return QuantDiT.quant_config_from_args(qargs)


# ---------------------------------------------------------------- the probe (a subprocess)

def _status_bytes(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def probe_child(args):
    """Forward passes at batch 32: the rise of the peak RSS over the RSS before (first call, repeat) per tokens."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        raise UserError("the probe resets the peak RSS through /proc/self/clear_refs (Linux): pass --no-probe")
    torch.set_grad_enabled(False)
    threads.set_threads(args.threads)
    baseline, patch = _status_bytes("VmRSS"), int(args.model.rsplit("/", 1)[1])
    model = random_model(args.model, patch, args.seed)
    D = model.pos_embed.shape[-1]

    def forward(tokens):
        side = max(1, round(tokens ** 0.5))  # the weights do not depend on the tokens, the sin-cos embedding does
        model.pos_embed = torch.nn.Parameter(torch.from_numpy(get_2d_sincos_pos_embed(D, side)).float()[None], False)
        x, t = torch.randn(CALIB_ROWS, 4, side * patch, side * patch), torch.randint(0, 1000, (CALIB_ROWS,))
        rises, t0 = [], time.perf_counter()
        for _ in range(2):
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            before = _status_bytes("VmRSS")
            model(x, t, t)
            rises.append(_status_bytes("VmHWM") - before)
        return {"tokens": side * side, "first_bytes": rises[0], "repeat_bytes": rises[1], "s": time.perf_counter() - t0}

    forward(1)  # warm-up: the libraries' one-time allocations
    out = {"baseline_rss_bytes": baseline, "full": [forward(n) for n in args.probe_full]}
    model.blocks = model.blocks[:1]
    out["block"] = [forward(n) for n in args.probe_block]
    with open(args.probe_child, "w") as f:
        json.dump(out, f)


def run_probe(args):
    path = os.path.join(args.cache, f"probe-{os.getpid()}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--threads", str(args.threads),
           "--seed", str(args.seed), "--probe-full", *map(str, args.probe_full), "--probe-block",
           *map(str, args.probe_block), "--probe-child", path]
    print(f"probe: forward passes of {args.model} at batch {CALIB_ROWS} ...", file=sys.stderr, flush=True)
    # glibc's mmap threshold at 64 KiB: a freed tensor's pages go back at once, so the peak RSS is the peak of the
    # live tensors (as it is anyway where every activation exceeds glibc's largest dynamic threshold, 32 MiB)
    if subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")).returncode:
        raise UserError("the probe subprocess failed (see above)")
    with open(path) as f:
        probe = json.load(f)
    os.remove(path)
    model = meta_model(args.model, int(args.model.rsplit("/", 1)[1]))
    for r in probe["full"] + probe["block"]:
        r["predicted_bytes"] = activation_bytes(model, CALIB_ROWS * r["tokens"])[0]
    return probe


# ---------------------------------------------------------------- the report

COLUMNS = ["scheme", "TAS statistics s", "candidates s", "alpha search s", "build layers s", "total s (report)",
           "process wall s", "process CPU s", "peak RSS GiB", "peak CUDA GiB", "search state max group GiB",
           "search state total GiB", "SVDs", "FP passes", "groups", "CPU stolen by the host %"]
PROJECTION_COLUMNS = ["scheme", "image px", "tokens", "steps", "FP model GiB", "search state GiB", "activations GiB",
                      "largest at", "projected peak GiB", "host: per-step ranges GiB", "load peak GiB",
                      "measured peak GiB", "measured as"]
PROJECTION_NOTE = (
    "projected peak = FP model + the largest layer group's search state that QuantDiT plans in this memory "
    "(quant/budget.py's formulas, held to the bytes held by tests/test_budget.py; one layer's transient shortlist "
    "candidates included) + activations: the larger of one block forward's float32 tensors (max(7 D, 3 D + 2 H) per "
    "token row; SDPA: no tokens x tokens matrix; the probe checks it) and, at each quantized layer's input, the "
    "tensors live there plus its search workspace (quant/budget.py's workspace_bytes, an estimate not measured "
    "here). On CUDA the shortlist's per-step activation ranges are kept in pinned host memory (host column); on the "
    "CPU they are in the state. load peak = loading --ckpt: download._load_file's whole state dict and the model it "
    "is copied into. Neither counts the interpreter nor the quantized layers built last.")


def _proj_cells(r):
    return [r["scheme"], r["px"], r["tokens"], r["steps"], _gib(r["model"]), _gib(r["state"], 3),
            _gib(r["activations"], 3), r["where"], _gib(r["projected"]), _gib(r["host"]), _gib(r["load"]),
            _gib(r.get("measured")), r.get("measured_as", "-")]
PROBE_COLUMNS = ["forward", "tokens", "predicted MiB", "first call MiB", "repeat MiB", "repeat / predicted", "s"]


def _gib(b, digits=2):
    return "n/a" if b is None else f"{b / GIB:.{digits}f}"


def _table(cols, rows):
    return ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def run_cells(scheme, run):
    report = run["report"] or {}
    t, c = report.get("timings") or {}, report.get("calibration") or {}
    secs = [("n/a" if t.get(k) is None else f"{t[k]:.1f}") for k in
            ("tas_statistics_s", "prepare_candidates_s", "alpha_search_s", "build_layers_s", "total_s")]
    svds = "n/a" if c.get("svds") is None else f"{c['svds']} ({c.get('svd', '?')})"
    return [scheme if run["exit"] == 0 else f"{scheme} (failed: exit {run['exit']})", *secs, f"{run['wall_s']:.1f}",
            f"{run['cpu_s']:.1f}", _gib(run["peak_rss_bytes"]), _gib(c.get("peak_cuda_bytes")),
            _gib(c.get("state_bytes_max"), 3), _gib(c.get("state_bytes_total"), 3), svds,
            *(c.get(k, "n/a") for k in ("fp_passes", "groups")),
            "n/a" if run.get("stolen_share") is None else f"{100 * run['stolen_share']:.0f}"]


def document(args, header, runs, proj, probe):
    doc = [f"# QuantDiT.py at scale: {args.model}, random weights", "", *header, "",
           *_table(COLUMNS, [run_cells(s, r) for s, r in runs.items()]), "",
           f"Projection to the paper's calibration batch ({CALIB_ROWS} rows of tokens: 16 labels x 2 for guidance):",
           "", *_table(PROJECTION_COLUMNS, [_proj_cells(r) for r in proj]), "", PROJECTION_NOTE, ""]
    if probe is None:
        return doc + ["Probe: skipped (--no-probe)."]
    rows = [[what, r["tokens"], *(f"{r[k] / MIB:.1f}" for k in ("predicted_bytes", "first_bytes", "repeat_bytes")),
             f"{r['repeat_bytes'] / max(r['predicted_bytes'], 1):.2f}", f"{r['s']:.1f}"]
            for what, key in (("whole model", "full"), ("one block", "block")) for r in probe[key]]
    return doc + [f"Probe: the activation model vs the rise of the peak RSS of forward-only passes (CPU, batch "
                  f"{CALIB_ROWS}, {args.threads} thread(s), glibc's mmap threshold 64 KiB; baseline after importing "
                  f"torch {_gib(probe['baseline_rss_bytes'])} GiB):", "", *_table(PROBE_COLUMNS, rows)]


def main(args):
    if args.model not in DiT_models:
        raise UserError(f"unknown model {args.model!r}; choose one of {', '.join(DiT_models)}")
    if args.probe_child:
        return probe_child(args)
    patch, latent = int(args.model.rsplit("/", 1)[1]), args.image_size // 8
    if args.image_size % 8 or latent % patch:
        raise UserError(f"--image-size {args.image_size}: its latent side (1/8) must be a multiple of {patch}")
    schemes = args.schemes.split(",")
    if any(s not in ("ditas", "reference") for s in schemes):
        raise UserError(f"--schemes {args.schemes}: a comma list of ditas, reference")
    import QuantDiT
    qargs = {s: QuantDiT.build_parser().parse_known_args(["--scheme", s, *shlex.split(args.extra)])[0]
             for s in schemes}  # each run's QuantDiT flags
    cfgs = {s: quant_config(q) for s, q in qargs.items()}
    args.out = args.out or os.path.join(ROOT, "bench", "results", "calib_memory.md" if args.project else "scale.md")
    cli.check_writable(args.out, "--out")
    if args.project:
        return write_projection(args, qargs)

    # The checkpoint, the runs, the probe
    ckpt = random_checkpoint(args, latent)
    load_before, runs, cmds = os.getloadavg(), {}, {}
    for s in schemes:
        out_dir = os.path.join(args.cache, run_name(args, s))
        launch = [] if args.nproc == 1 else ["launch.py", "--standalone", f"--nproc_per_node={args.nproc}"]
        cmds[s] = [sys.executable, *launch, "QuantDiT.py", "--model", args.model, "--ckpt", _rel(ckpt), "--image-size",
                   str(args.image_size), "--vae", "mse", "--no-preview", "--num-sampling-steps", str(args.steps),
                   "--threads", str(args.threads), "--scheme", s, "--out", _rel(out_dir), "--overwrite",
                   "--device", args.device, *shlex.split(args.extra)]
        print(f"running {shlex.join(cmds[s][1:])}", file=sys.stderr, flush=True)
        runs[s] = run_quantdit(cmds[s], out_dir)
    probe = run_probe(args) if args.probe else None
    load_after = os.getloadavg()

    # The report
    tokens = (latent // patch) ** 2
    each = shlex.join(["python", *cmds[schemes[0]][1:]]).replace(f"--scheme {schemes[0]}", "--scheme S")
    loads = ["/".join(f"{x:.2f}" for x in la) for la in (load_before, load_after)]
    header = [f"Command: `{shlex.join(['python', 'bench/scale.py', *sys.argv[1:]])}`; each run (S = "
              f"{', '.join(schemes)}): `{each}`", "",
              f"{args.model} (random weights: {_rel(ckpt)}), {args.image_size} px = {latent}x{latent} latent = "
              f"{tokens} tokens, batch {CALIB_ROWS}, {args.steps} steps, {args.threads} thread(s)"
              f"{'' if args.nproc == 1 else f' in each of {args.nproc} processes'}; torch "
              f"{torch.__version__}, Python {platform.python_version()}, {cpu_name()}, {os.cpu_count()} cores; "
              f"load average (1/5/15 min) before {loads[0]}, after {loads[1]}."]
    proj = projection(args, runs, qargs, latent)
    write_report(args.out, document(args, header, runs, proj, probe))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"args": vars(args), "header": header, "tokens": tokens, "loadavg": [load_before, load_after],
                   "commands": cmds, "quant_configs": {s: c.to_dict() for s, c in cfgs.items()}, "runs": runs,
                   "projection": proj, "probe": probe}, f, indent=1)
    failed = [s for s, r in runs.items() if r["exit"]]
    if failed:
        raise UserError(f"QuantDiT.py failed for {', '.join(failed)}: see {', '.join(runs[s]['log'] for s in failed)}")


def write_projection(args, qargs):
    """--project: the projected peak of calibration with QuantDiT's flags per scheme on args.device (auto: CUDA),
    at 256 and 512 px for every --project-steps, from the formulas alone."""
    device_type = "cpu" if args.device == "cpu" else "cuda"
    rows = []
    for scheme, q in qargs.items():
        for px, latent in PROJECT.items():
            for steps in args.project_steps:
                cfg = quant_config(q)
                batch, chunks = calib_batch(q)
                row = project(args.model, cfg, device_type, px, latent, steps,
                              round(q.calib_memory_gb * BUDGET_GIB), chunks, batch)
                rows.append({**row, "scheme": scheme, "batch": batch, "chunks": chunks})
    flags = f" {args.extra}" if args.extra else ""
    doc = [f"# Projected peak memory of calibration: {args.model} on {device_type}", "",
           f"Command: `{shlex.join(['python', 'bench/scale.py', *sys.argv[1:]])}`: QuantDiT.py's defaults{flags} "
           f"(--calib-memory-gb {qargs[next(iter(qargs))].calib_memory_gb:g}), calibration batch per "
           f"scheme (samples x 2 for guidance, in chunks): "
           + ", ".join(sorted({f"{r['scheme']} {r['batch']} rows in {r['chunks']}" for r in rows})) +
           "; one process; from the formulas alone (no run).", "",
           *_table(PROJECTION_COLUMNS, [_proj_cells(r) for r in rows]), "", PROJECTION_NOTE]
    write_report(args.out, doc)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"args": vars(args), "device": device_type, "projection": rows}, f, indent=1)


def run_name(args, scheme):
    """The run's directory name in --cache: model, size, scheme, processes and the extra flags (each setting
    its own checkpoint)."""
    procs = "" if args.nproc == 1 else f"-{args.nproc}proc"
    extra = re.sub(r"[^A-Za-z0-9.]+", "-", args.extra).strip("-")
    return f"{args.model.replace('/', '-')}-{args.image_size}-{scheme}{procs}{'-' + extra if extra else ''}"


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="DiT-XL/2", help="DiT variant (DiT-S/2, DiT-B/2 for quick checks)")
    p.add_argument("--image-size", type=int, default=32, help="pixels; the latent is 1/8 of it")
    p.add_argument("--steps", type=int, default=10, help="QuantDiT's --num-sampling-steps")
    p.add_argument("--threads", type=int, default=2, help="threads of every subprocess")
    p.add_argument("--nproc", type=int, default=1, help="QuantDiT processes of each run (launch.py; CPU: gloo)")
    p.add_argument("--schemes", default="ditas,reference", help="comma list of QuantDiT's --scheme values")
    p.add_argument("--extra", default="", help="more QuantDiT.py flags, one string (--extra=--flag without a space)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="QuantDiT's --device")
    p.add_argument("--seed", type=int, default=0, help="the random checkpoint's seed")
    p.add_argument("--cache", default=os.path.join(ROOT, "results", "scale"), help="checkpoints, runs and logs")
    p.add_argument("--probe", action=cli.argparse.BooleanOptionalAction, default=True, help="check the activations")
    p.add_argument("--probe-full", type=int, nargs="*", default=[4, 16], help="tokens (squares) of whole-model passes")
    p.add_argument("--probe-block", type=int, nargs="*", default=[64, 256], help="tokens (squares) of one-block passes")
    p.add_argument("--out", help="the report and its .json (default bench/results/scale.md; --project: calib_memory.md)")
    p.add_argument("--project", action="store_true", help="run nothing: the projected peaks at 256 and 512 px")
    p.add_argument("--project-steps", type=int, nargs="+", default=[50, 100, 250], help="--project: calibration steps")
    p.add_argument("--probe-child", help=cli.argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    cli.run(main, build_parser().parse_args())
