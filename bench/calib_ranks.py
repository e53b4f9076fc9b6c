"""Calibration over several processes: one process vs N under torchrun, the same checkpoint.

    python bench/calib_ranks.py                 # the bundled DiT-T/2, QuantDiT defaults, 50 steps, 1 vs 2 processes
    python bench/calib_ranks.py --steps 20 --nproc 2 --quantdit-flags "--weight-bit 8"

Each run is `QuantDiT.py` on the bundled model (no preview) in a subprocess, every process at one
thread (`--threads 1`): first alone, then `launch.py --standalone --nproc_per_node=N`. Each rank
calibrates its share of the layers (quant/ranks.py) and runs the FP sampling loops itself, so
the FP loops are paid N times and the candidate preparation and scoring split. Reported: wall
time, the phases of rank 0's report, and whether model.safetensors and quant_config.json are
byte-identical. Target: 2 processes in at most 0.65x the wall time of one. Writes
bench/results/calib_ranks.md.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import cpu_name, write_report  # noqa: E402
from bundled.digits import BUNDLED_FLAGS  # noqa: E402

CHECKPOINT_FILES = ("model.safetensors", "quant_config.json")


def run(nproc, steps, out, extra):
    """(wall s, report) of one calibration with nproc processes at one thread each."""
    flags = [*BUNDLED_FLAGS, "--num-sampling-steps", str(steps), "--no-preview", "--threads", "1", "--overwrite",
             "--out", out, *extra]
    cmd = [sys.executable, "QuantDiT.py", *flags] if nproc == 1 else \
        [sys.executable, "launch.py", "--standalone", f"--nproc_per_node={nproc}", "QuantDiT.py", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd[1:3])} failed:\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, "report.json")) as f:
        return wall, json.load(f)


def same_files(a, b):
    return all(open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read()
               for n in CHECKPOINT_FILES)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50, help="calibration steps (default: %(default)s)")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the parallel run (default: %(default)s)")
    ap.add_argument("--quantdit-flags", default="", help="extra QuantDiT.py flags")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "calib_ranks.md"), help="the report")
    args = ap.parse_args()
    extra = args.quantdit_flags.split()
    load0 = os.getloadavg()
    rows, walls = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, args.nproc):
            wall, rep = run(n, args.steps, os.path.join(tmp, f"n{n}"), extra)
            walls[n] = wall
            t, cal = rep["timings"], rep["calibration"]
            rows.append(f"| {n} | {wall:.1f} | {wall / walls[1]:.2f}x | {t['tas_statistics_s']:.1f} | "
                        f"{t['prepare_candidates_s']:.1f} | {t['alpha_search_s']:.1f} | "
                        f"{cal['fp_passes']} | {cal['peak_rss_bytes'] / 2 ** 20:.0f} |")
            print(rows[-1], flush=True)
        identical = same_files(os.path.join(tmp, "n1"), os.path.join(tmp, f"n{args.nproc}"))
    load1 = os.getloadavg()
    write_report(args.out, [
        "# Calibration over several processes", "",
        f"Command: `{' '.join(['python', 'bench/calib_ranks.py', *sys.argv[1:]])}`", "",
        f"QuantDiT.py on the bundled DiT-T/2 with its defaults, {args.steps} calibration steps, no preview, one "
        f"thread per process. Machine: {cpu_name()}, {len(os.sched_getaffinity(0))} cores; load average "
        f"{load0[0]:.2f} before, {load1[0]:.2f} after. Phases: rank 0's report (each rank runs its own FP loops).", "",
        "| processes | wall (s) | vs 1 | TAS pass (s) | candidates (s) | alpha search (s) | FP loops per rank | "
        "peak RSS rank 0 (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
        f"model.safetensors and quant_config.json byte-identical: **{'yes' if identical else 'NO'}**. "
        f"Target: {args.nproc} processes <= 0.65x of one: **{'met' if walls[args.nproc] <= 0.65 * walls[1] else 'not met'}**"
        f" ({walls[args.nproc] / walls[1]:.2f}x)."])
    if not identical:
        sys.exit("error: the checkpoints differ")


if __name__ == "__main__":
    main()
