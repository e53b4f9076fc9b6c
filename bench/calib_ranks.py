"""Calibration over several processes: one process vs N under torchrun, the same checkpoint.

    python bench/calib_ranks.py                 # the bundled DiT-T/2, QuantDiT defaults, 50 steps, 1 vs 2 processes
    python bench/calib_ranks.py --steps 20 --nproc 2 --repeats 1 --quantdit-flags "--weight-bit 8"

Each run is `QuantDiT.py` on the bundled model (no preview) in a subprocess, every process at one
thread (`--threads 1`), alone or under `launch.py --standalone --nproc_per_node=N`. Four settings,
taken in turn in every repeat so that load changes hit them alike:

    1 process                    the default, one chunk: the baseline of the target
    N processes, chunks N        --calib-chunks N: each rank runs one chunk of the FP loops and observes
                                 every layer (quant/calibration/feed.py)
    1 process, chunks N          the same results as the line above (byte-identical checkpoints)
    N processes                  one chunk: every rank runs the whole FP loops (its layers observed)

Reported: wall time of each run and the calibration's own time (report total_s: from the loaded
model to the calibrated one, without the interpreter's and the launcher's start-up, the model
load and saving), min / median / max over repeats, their per-repeat ratios to the 1-process default,
rank 0's phases, the share of the CPU time a virtual machine's host stole during each run, and whether
the checkpoints (model.safetensors, quant_config.json) of each pair are byte-identical. Target: N
processes in at most 0.65x the wall time of one (the median ratio: a shared machine's load swings
single runs by +-15 %). Writes bench/results/calib_ranks.md.
"""
import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common import ROOT, cpu_name, stolen_seconds, stolen_share, write_report
from bundled.digits import BUNDLED_FLAGS

CHECKPOINT_FILES = ("model.safetensors", "quant_config.json")


def run(nproc, chunks, steps, out, extra):
    """(wall s, report, share of the machine's CPU time stolen by its host or None) of one calibration with
    nproc processes at one thread each."""
    flags = [*BUNDLED_FLAGS, "--num-sampling-steps", str(steps), "--no-preview", "--threads", "1", "--overwrite",
             "--out", out, "--calib-chunks", str(chunks), *extra]
    cmd = [sys.executable, "QuantDiT.py", *flags] if nproc == 1 else \
        [sys.executable, "launch.py", "--standalone", f"--nproc_per_node={nproc}", "QuantDiT.py", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0, stolen0 = time.time(), stolen_seconds()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    steal = stolen_share(stolen0, wall)
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd[1:3])} failed:\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, "report.json")) as f:
        return wall, json.load(f), steal


def same_files(a, b):
    return all(open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read()
               for n in CHECKPOINT_FILES)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50, help="calibration steps (default: %(default)s)")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the parallel runs (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of the four settings (default: %(default)s)")
    ap.add_argument("--quantdit-flags", default="", help="extra QuantDiT.py flags")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "calib_ranks.md"), help="the report")
    args = ap.parse_args()
    extra, n = args.quantdit_flags.split(), args.nproc
    settings = [(1, 1), (n, n), (1, n), (n, 1)]  # (processes, chunks); the first is the baseline
    load0 = os.getloadavg()
    walls, calib, steals = {s: [] for s in settings}, {s: [] for s in settings}, {s: [] for s in settings}
    reports, identical = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for procs, chunks in settings:
                out = os.path.join(tmp, f"p{procs}c{chunks}")
                wall, reports[procs, chunks], steal = run(procs, chunks, args.steps, out, extra)
                walls[procs, chunks].append(wall)
                steals[procs, chunks].append(steal)
                calib[procs, chunks].append(reports[procs, chunks]["timings"]["total_s"])
                print(f"repeat {rep + 1}: {procs} process(es), {chunks} chunk(s): {wall:.1f} s, calibration "
                      f"{calib[procs, chunks][-1]:.1f} s", flush=True)
            for a, b in (((1, n), (n, n)), ((1, 1), (n, 1))):
                identical[a, b] = identical.get((a, b), True) and same_files(
                    os.path.join(tmp, f"p{a[0]}c{a[1]}"), os.path.join(tmp, f"p{b[0]}c{b[1]}"))
    load1 = os.getloadavg()
    ratios = lambda times, s: [x / b for x, b in zip(times[s], times[1, 1])]  # noqa: E731 (per repeat)
    span = lambda xs, fmt: " / ".join(fmt.format(v) for v in (min(xs), statistics.median(xs), max(xs)))  # noqa: E731
    rows = []
    for s in settings:
        t, cal = reports[s]["timings"], reports[s]["calibration"]
        how = "one chunk" if s[1] == 1 else f"{s[1]} chunks" + (", divided" if cal["fp_by_chunks"] else "")
        rows.append(f"| {s[0]} | {how} | {span(walls[s], '{:.1f}')} | {span(ratios(walls, s), '{:.2f}x')} | "
                    f"{span(calib[s], '{:.1f}')} | {span(ratios(calib, s), '{:.2f}x')} | "
                    f"{t['tas_statistics_s']:.1f} | {t['prepare_candidates_s']:.1f} | "
                    f"{t['alpha_search_s']:.1f} | {cal['fp_passes']} | {cal['peak_rss_bytes'] / 2 ** 20:.0f} | "
                    f"{'n/a' if None in steals[s] else span([100 * x for x in steals[s]], '{:.0f}')} |")
    wall_r, calib_r = ratios(walls, (n, n)), ratios(calib, (n, n))
    verdict = lambda rs: (f"**{'met' if statistics.median(rs) <= 0.65 else 'not met'}** (median "  # noqa: E731
                          f"{statistics.median(rs):.2f}x; {min(rs):.2f}x to {max(rs):.2f}x)")
    same = lambda a, b: "yes" if identical[a, b] else "NO"  # noqa: E731
    write_report(args.out, [
        "# Calibration over several processes", "",
        f"Command: `{' '.join(['python', 'bench/calib_ranks.py', *sys.argv[1:]])}`", "",
        f"QuantDiT.py on the bundled DiT-T/2 with its defaults{' ' + args.quantdit_flags if extra else ''}, "
        f"{args.steps} calibration steps, no preview, one thread per process; {args.repeats} repeats, the four "
        f"settings in turn. Machine: {cpu_name()}, {len(os.sched_getaffinity(0))} cores, torch "
        f"{importlib.metadata.version('torch')}; load average "
        f"{load0[0]:.2f} before, {load1[0]:.2f} after. Wall: the whole process (launcher and start-up included); "
        f"calibration: report total_s (loaded model to calibrated model); the phases: rank 0's report of the "
        f"last repeat.", "",
        "| processes | FP loops | wall s, min / median / max | wall vs 1 process, per repeat | calibration s | "
        "calibration vs 1 process | TAS pass s | candidates s | alpha search s | FP loops per rank | "
        "peak RSS rank 0 (MiB) | CPU time stolen by the host, % |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
        "Stolen: the steal time of /proc/stat during each run, as a share of all CPUs' time over its wall time "
        "(min / median / max): on a virtual machine, the CPU its host gave to other guests.", "",
        f"Byte-identical model.safetensors and quant_config.json: 1 process vs {n} with {n} chunks: "
        f"**{same((1, n), (n, n))}**; 1 process vs {n} with one chunk: **{same((1, 1), (n, 1))}**.", "",
        f"Target: {n} processes (`--calib-chunks {n}`) <= 0.65x of one process (the default), the median of the "
        f"repeats: "
        f"wall {verdict(wall_r)}; calibration {verdict(calib_r)}."])
    if not all(identical.values()):
        sys.exit("error: the checkpoints differ")


if __name__ == "__main__":
    main()
