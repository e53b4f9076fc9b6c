"""Question: what do several processes cost before any calibration (torchrun's start and stop), and how noisy is
this machine?

Answer (bench/results/launcher_overhead.md): launch.py with 2 trivial workers takes 9.4 s (median; 7.7-12.4) against
3.0 s for `python -c "import torch"`: 5-9 s of start and stop in every multi-process run (bench/calib_ranks.py's
wall times include it). A fixed one-thread loop run as 2 copies at once takes 0.72x-1.34x its lone time, with
0.4-3.4 s per CPU stolen by the host: single timings here carry about 30 % noise.

    python bench/studies/launcher_overhead.py [--repeats 3 --nproc 2 --loops 400]

A. A trivial worker (import torch, gloo init, a barrier, exit) under `launch.py --standalone
   --nproc_per_node=N`, against `python -c "import torch"`: the launcher's wall time, split at the
   workers' first and last timestamps (launcher start -> workers start, the workers' imports, gloo init,
   workers end -> launcher exit).
B. A fixed 1-thread loop of 512x512 matmuls and GELUs on 2048x768: one copy alone, then N copies at once.
   Each copy's time over the lone copy's, and the steal time of every CPU meanwhile (/proc/stat: the
   CPU time a virtual machine's host gave to other guests).

Every process at one thread. Writes bench/results/launcher_overhead.md.
"""
import time

STARTED = time.time()  # a worker's start, before torch is imported (cli imports it)

import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from ditas import cli  # noqa: E402
from bench.common import ROOT, cpu_name, stolen_seconds, write_report  # noqa: E402
from quant.errors import UserError  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def worker(out):
    """Under launch.py: timestamps of this rank's start, its imports done, gloo up, barrier passed."""
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    t0, t1 = STARTED, time.time()
    dist.init_process_group("gloo")
    t2 = time.time()
    dist.barrier()
    dist.destroy_process_group()
    with open(f"{out}.{os.environ['RANK']}", "w") as f:
        json.dump({"start": t0, "imported": t1, "init": t2, "end": time.time()}, f)


def burn(loops):
    """Seconds of the fixed loop at one thread."""
    import torch
    torch.set_num_threads(1)
    a, x = torch.randn(512, 512), torch.randn(2048, 768)
    t = time.perf_counter()
    for _ in range(loops):
        a @ a
        torch.nn.functional.gelu(x, approximate="tanh")
    return time.perf_counter() - t


def launched(nproc, tmp):
    """{phase: s} of one launch.py run of the trivial worker."""
    out = os.path.join(tmp, "stamps")
    t0 = time.time()
    subprocess.run([sys.executable, "launch.py", "--standalone", f"--nproc_per_node={nproc}", __file__,
                    "--worker", out], cwd=ROOT, env=ENV, check=True, capture_output=True)
    t1 = time.time()
    ranks = [json.load(open(f"{out}.{r}")) for r in range(nproc)]
    start, end = min(r["start"] for r in ranks), max(r["end"] for r in ranks)
    return {"wall": t1 - t0, "to workers": start - t0, "imports": max(r["imported"] - r["start"] for r in ranks),
            "gloo init": max(r["init"] - r["imported"] for r in ranks), "after workers": t1 - end}


def plain_import():
    t0 = time.time()
    subprocess.run([sys.executable, "-c", "import torch"], env=ENV, check=True)
    return time.time() - t0


def concurrent(copies, loops):
    """([each copy's s], [each CPU's stolen s]) of `copies` burn processes started together."""
    cpus = [f"cpu{i}" for i in range(os.cpu_count())]
    before = [stolen_seconds(cpu=c) for c in cpus]
    procs = [subprocess.Popen([sys.executable, __file__, "--burn", str(loops)], env=ENV, stdout=subprocess.PIPE,
                              text=True) for _ in range(copies)]
    times = [float(p.communicate()[0]) for p in procs]
    after = [stolen_seconds(cpu=c) for c in cpus]
    return times, [None if b is None else a - b for a, b in zip(after, before)]


def main(args):
    if min(args.repeats, args.nproc, args.loops) < 1:
        raise UserError("--repeats, --nproc and --loops must be at least 1")
    span = lambda xs: " / ".join(f"{v:.2f}" for v in (min(xs), statistics.median(xs), max(xs)))  # noqa: E731
    load0 = os.getloadavg()
    runs, imports, pairs = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            imports.append(plain_import())
            runs.append(launched(args.nproc, tmp))
            alone, _ = concurrent(1, args.loops)
            pairs.append((alone[0], *concurrent(args.nproc, args.loops)))
    load1 = os.getloadavg()
    phases = list(runs[0])
    steal = lambda s: "n/a" if None in s else " / ".join(f"{v:.2f}" for v in s)  # noqa: E731
    write_report(args.out, [
        "# Start-up of several processes, and this machine's noise", "",
        f"Command: `{' '.join(['python', 'bench/studies/launcher_overhead.py', *sys.argv[1:]])}`", "",
        f"{cpu_name()}, {os.cpu_count()} cores; torch {__import__('torch').__version__}; one thread per process; "
        f"{args.repeats} repeats; load average {load0[0]:.2f} before, {load1[0]:.2f} after.", "",
        f"## A. launch.py with {args.nproc} trivial workers (import torch, gloo init, barrier), s, min / median / max",
        "",
        "| `python -c \"import torch\"` | " + " | ".join(phases) + " |",
        "|---:|" + "---:|" * len(phases),
        f"| {span(imports)} | " + " | ".join(span([r[p] for r in runs]) for p in phases) + " |", "",
        "to workers: the launcher's start to the first worker's; after workers: the last worker's end to the "
        "launcher's exit (its shutdown and the workers' interpreter teardown).", "",
        f"## B. A fixed 1-thread loop ({args.loops} x (512x512 matmul + GELU on 2048x768)), alone and as "
        f"{args.nproc} copies at once", "",
        "| alone s | copies s | copies / alone | stolen s per CPU (cpu0 / cpu1 / ...) during the copies |",
        "|---:|---|---|---|",
        *(f"| {a:.2f} | {' / '.join(f'{t:.2f}' for t in ts)} | {' / '.join(f'{t / a:.2f}x' for t in ts)} | "
          f"{steal(st)} |" for a, ts, st in pairs)])


def build_parser():
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="rounds of A and B")
    p.add_argument("--nproc", type=int, default=2, help="workers under launch.py, and copies of the loop")
    p.add_argument("--loops", type=int, default=400, help="iterations of the fixed loop")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "launcher_overhead.md"), help="the report")
    p.add_argument("--worker", help=cli.argparse.SUPPRESS)
    p.add_argument("--burn", type=int, help=cli.argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    a = build_parser().parse_args()
    if a.worker:
        worker(a.worker)
    elif a.burn:
        print(f"{burn(a.burn):.4f}")
    else:
        cli.run(main, a)
