"""Question: what do busy processes on the machine cost the bundled-model calibration, per OpenMP wait policy?

Answer (bench/results/busy.md): spinning waits (OMP_WAIT_POLICY=ACTIVE) take 5.1x the CPU time and 9.7x the wall
time next to 2 busy processes; always sleeping (PASSIVE) costs 1.6x wall time on a quiet machine; ditas/threads.py's
default (PASSIVE only when fewer idle cores than threads at start) has the spinning speed when quiet and PASSIVE's
CPU time when busy (1.00x).

    python bench/studies/busy.py                       # W8A8, 20 calibration steps, 2 busy processes, both settings
    python bench/studies/busy.py --steps 50 --busy 1   # the documented calibration, one competitor

Each run is `QuantDiT.py` on the bundled DiT-T/2 (W8A8, no preview) in a subprocess; its CPU time is
the child's user + system time (getrusage). "Busy" starts N pure-Python spin loops (one core each)
half a second before the run and keeps them for its duration. Three settings:

* default: no OMP_WAIT_POLICY, so ditas/threads.py chooses from the load at start (PASSIVE when the idle
  cores are fewer than the threads, else libgomp's spin-then-sleep); as many threads as the
  affinity mask allows. The "wait" columns show what it chose;
* passive: OMP_WAIT_POLICY=PASSIVE at every load (waiting threads sleep at once);
* spinning: OMP_WAIT_POLICY=ACTIVE with libgomp's default GOMP_SPINCOUNT=300000, 2 threads.

Writes bench/results/busy.md.
"""
import argparse
import os
import re
import resource
import subprocess
import sys
import time
from importlib.metadata import version

from bench.common import ROOT, cpu_name, write_report
from bundled.digits import BUNDLED_FLAGS

SETTINGS = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
            "spinning": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000", "THREADS": "2"}}
WAIT = re.compile(r"OpenMP wait (\S+)")  # QuantDiT.py's "calibrating ..." line


def run(setting, steps, busy, tmp, extra_flags=()):
    """(wall s, CPU s, OpenMP wait policy) of one calibration with `busy` spinning competitors."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    extra = dict(SETTINGS[setting])
    threads = extra.pop("THREADS", None)
    env.update(extra)
    cmd = [sys.executable, "QuantDiT.py", *BUNDLED_FLAGS, "--weight-bit", "8", "--act-bit", "8",
           "--num-sampling-steps", str(steps), "--no-preview", "--overwrite", "--out", os.path.join(tmp, setting)]
    if threads:
        cmd += ["--threads", threads]
    cmd += list(extra_flags)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        if hogs:
            time.sleep(0.5)  # spinning before the run starts (and measures the load)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # before the hogs are reaped: the child's alone
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    if proc.returncode:
        sys.exit(f"error: QuantDiT.py failed:\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    wait = WAIT.search(proc.stdout)
    return wall, cpu, wait.group(1).rstrip(";,") if wait else "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="calibration steps (default: %(default)s)")
    ap.add_argument("--busy", type=int, default=2, help="busy competing processes (default: %(default)s)")
    ap.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS),
                    help="what to compare (default: all)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "busy.md"), help="the report")
    ap.add_argument("--quantdit-flags", default="", help="extra QuantDiT.py flags (e.g. a cheaper smoke setting)")
    args = ap.parse_args()
    import tempfile
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            quiet = run(setting, args.steps, 0, tmp, args.quantdit_flags.split())
            busy = run(setting, args.steps, args.busy, tmp, args.quantdit_flags.split())
            rows.append(f"| {setting} | {quiet[2]} | {quiet[0]:.1f} | {quiet[1]:.1f} | {busy[2]} | {busy[0]:.1f} | "
                        f"{busy[1]:.1f} | **{busy[1] / quiet[1]:.2f}x** | {busy[0] / quiet[0]:.2f}x |")
            print(rows[-1], flush=True)
    write_report(args.out, [
        "# The bundled-model calibration on a busy machine", "",
        f"Command: `python bench/studies/busy.py {' '.join(sys.argv[1:])}`", "",
        f"QuantDiT.py on the bundled DiT-T/2, W8A8, {args.steps} calibration steps, no preview; busy = "
        f"{args.busy} pure-Python spin loops. Machine: {cpu_name()}, {len(os.sched_getaffinity(0))} cores "
        f"available, torch {version('torch')}, {time.strftime('%Y-%m-%d')}. CPU = the run's user + system seconds; "
        "wait = the OpenMP wait policy the run had.", "",
        "| setting | quiet wait | quiet wall (s) | quiet CPU (s) | busy wait | busy wall (s) | busy CPU (s) | "
        "CPU busy/quiet | wall busy/quiet |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|", *rows])


if __name__ == "__main__":
    main()
