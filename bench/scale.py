"""QuantDiT.py end to end on a random DiT-XL/2 at a few tokens, and its peak memory projected to 256 and 1024 tokens.

    python bench/scale.py                      # DiT-XL/2, 32 px (4x4 latent: 4 tokens), 10 steps, both schemes (~1 h)
    python bench/scale.py --model DiT-S/2 --steps 2 --schemes reference --threads 1    # a quick check
    python bench/scale.py --extra "--calib-memory-gb 4" --device cuda
    python bench/scale.py --schemes ditas --nproc 2 --threads 1 --no-probe --extra=--calib-chunks=2 \
        --out bench/results/scale_ranks_chunks.md
    python bench/scale.py --project --out bench/results/calib_memory.md   # GPU peaks from the formulas, no run
    python bench/scale.py --state-parts --steps 100 --image-size 256    # the search state by part, no run
    python bench/scale.py --compare results/scale/DiT-XL-2-32-ditas results/scale/DiT-XL-2-32-ditas-2proc

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
--extra) at 256 and 512 px for --project-steps. --state-parts runs nothing: per part of the calibration's search
state (kept candidates, round-to-nearest baselines, loss-engine operands, pass-1 statistics and their per-step
ranges) the bytes summed over every quantized layer, for QuantDiT's defaults plus --extra (run reports carry the
total as state_bytes_estimated). --compare A B: two runs that should agree but not bit for bit (another thread
count, process count or machine), per layer the chosen alpha, the output error at it (report.json's output_error)
and the search loss of every alpha both scored; exit 2 with one line for a directory without report.json or with
other layers.
"""
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

from ditas import threads  # noqa: F401  first: sets OpenMP's wait policy, read when torch loads
import torch
from bench.common import ROOT, cpu_name, stolen_seconds, stolen_share, write_report
from bench.scale_memory import (CALIB_ROWS, PROJECT, activation_bytes, calib_batch, meta_model, probe_child, project,
                                projection, quant_config, random_model, state_parts_lines)
from bench.scale_report import (PROJECTION_COLUMNS, PROJECTION_NOTE, compare, compare_table, document, load_layers,
                                md_table, projection_cells)
from ditas import cli
from models import DiT_models
from quant.calibration.budget import GIB as BUDGET_GIB
from quant.errors import UserError


def _rel(path):
    """path relative to the repository when inside it (the commands run there), else absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


# ---------------------------------------------------------------- the random checkpoint and one QuantDiT run


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


# ---------------------------------------------------------------- the probe (a subprocess: scale_memory.probe_child)

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


def main(args):
    if args.compare:
        return print("\n".join(compare_table(compare(*map(load_layers, args.compare)), *args.compare)))
    if args.model not in DiT_models:
        raise UserError(f"unknown --model {args.model!r}; choose one of {', '.join(DiT_models)}")
    if args.state_parts:
        return print("\n".join(state_parts_lines(args.model, args.extra, args.steps, args.image_size)))
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
                batch, chunks = calib_batch(q)
                row = project(args.model, quant_config(q), device_type, px, latent, steps,
                              round(q.calib_memory_gb * BUDGET_GIB), chunks, batch)
                rows.append({**row, "scheme": scheme, "batch": batch, "chunks": chunks})
    flags = f" {args.extra}" if args.extra else ""
    doc = [f"# Projected peak memory of calibration: {args.model} on {device_type}", "",
           f"Command: `{shlex.join(['python', 'bench/scale.py', *sys.argv[1:]])}`: QuantDiT.py's defaults{flags} "
           f"(--calib-memory-gb {qargs[next(iter(qargs))].calib_memory_gb:g}), calibration batch per "
           f"scheme (samples x 2 for guidance, in chunks): "
           + ", ".join(sorted({f"{r['scheme']} {r['batch']} rows in {r['chunks']}" for r in rows})) +
           "; one process; from the formulas alone (no run).", "",
           *md_table(PROJECTION_COLUMNS, [projection_cells(r) for r in rows]), "", PROJECTION_NOTE]
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
    p.add_argument("--state-parts", action="store_true", help="run nothing: the search state by part at --image-size "
                   "and --steps, for QuantDiT's defaults plus --extra (the budget's formulas), CPU and CUDA")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="run nothing: two QuantDiT.py output directories "
                   "compared layer by layer (alphas, output errors, losses at shared alphas)")
    p.add_argument("--probe-child", help=cli.argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    cli.run(main, build_parser().parse_args())
