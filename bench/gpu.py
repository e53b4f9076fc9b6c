"""The one prepared GPU check: random-weight DiT-XL/2 on one H100/H200 in under 8 minutes, a markdown report.

    python bench/gpu.py                          # every section; bench/results/gpu.md (and .json)
    python bench/gpu.py --sections gemm,e2e      # some of them
    python bench/gpu.py --dry-run                # the same code on CPU: tiny shapes, Triton's interpreter

Sections (each timed and capped; one that fails is reported with its error's one line and the others run; the
report is rewritten after each, so a run killed by a timeout keeps what finished):
  check     Triton int against fake on the device, W8A8 and W4A8 at the model's four layer shapes: activation
            codes equal to the quantizer's, outputs within the CPU tests' tolerances (tests/test_ops_triton.py)
  gemm      the four layer shapes at batch 32 x 256 tokens: cuBLAS bf16, torch._int_mm (B row-major and
            column-major), the Triton activation pass, GEMM and whole linear (W8A8, W4A8)
  e2e       one sampling step (a model forward) at batch 32 and 64, 256 px: bf16 against int W8A8 and W4A8, with
            weight and peak memory
  torchrun  sample_merge_TAS.py --backend int under a one-process torchrun (nccl on CUDA) on the bundled model
  calib     QuantDiT.py with its defaults, 256 px, 5 steps: wall time and peak memory against the projection
--dry-run: CPU, DiT-XS/2 at 32 px with weight groups of 32 (the defaults' 128 exceed its width), Triton under
TRITON_INTERPRET=1, gloo; its timings measure nothing, it keeps the code running (tests/test_gpu_bench.py).
"""
import datetime
import json
import os
import platform
import signal
import sys
import time
import types
from dataclasses import asdict, dataclass

from ditas import threads  # first: sets OpenMP's wait policy, read when torch loads
import torch
from ditas import cli
from bench.common import ROOT, cpu_name, write_report
from bench.gpu_sections import SECTIONS as FUNCTIONS, first_line
from quant.errors import UserError


@dataclass(frozen=True)
class Profile:
    """The shapes of a run. group: every quantized layer's weight group (QuantDiT's default on DiT-XL/2)."""
    device: str
    model: str
    image_size: int
    group: int
    batches: tuple
    gemm_rows: int     # M of the GEMM section: batch 32 x 256 tokens
    reps: int
    calib_steps: int


GPU = Profile("cuda", "DiT-XL/2", 256, 128, (32, 64), 32 * 256, 10, 5)
DRY = Profile("cpu", "DiT-XS/2", 32, 32, (1, 2), 64, 1, 2)
CAPS = {"check": 60, "gemm": 90, "e2e": 180, "torchrun": 90, "calib": 300}  # seconds per section
SECTIONS = tuple(CAPS)
TITLES = {"check": "Triton int against fake", "gemm": "GEMM at the four layer shapes",
          "e2e": "End-to-end sampling step", "torchrun": "One-process torchrun of sample_merge_TAS.py",
          "calib": "Calibration with the defaults"}


# ---------------------------------------------------------------- the run and the report

def targets(sections, prof):
    """[(target, measured, met)] from the sections that finished."""
    out, b = [], prof.batches[0]
    e2e = {(r["batch"], r["variant"]): r for r in sections.get("e2e", {}).get("data", [])}
    for v, goal in (("int W8A8", 1.3), ("int W4A8", 1.0)):
        if (b, v) in e2e:
            out.append((f"{v} >= {goal}x bf16 end to end, batch {b}", f"{e2e[b, v]['vs_bf16']:.2f}x",
                        e2e[b, v]["vs_bf16"] >= goal))
    if (b, "int W4A8") in e2e:
        for key, what in (("linear_bytes", "quantized linears"), ("weights_bytes", "whole model")):
            r = e2e[b, "int W4A8"][key] / e2e[b, "bf16"][key]
            out.append((f"int W4A8 weight memory <= 0.35x bf16's ({what})", f"{r:.2f}x", r <= 0.35))
    fc1 = sections.get("gemm", {}).get("data", {}).get("mlp.fc1")
    for bits in (8, 4) if fc1 else ():
        r = fc1["bf16 F.linear (cuBLAS)"] / fc1[f"Triton GEMM W{bits}A8"]
        out.append((f"fc1 Triton GEMM W{bits}A8 >= 1.6x bf16", f"{r:.2f}x", r >= 1.6))
    run = sections.get("torchrun", {}).get("data")
    if run and prof.device == "cuda":
        out.append(("one-process torchrun of sample_merge_TAS.py on nccl", f"{run['nccl_lines']} NCCL INFO lines",
                    run["nccl_lines"] > 0))
    if sections.get("check", {}).get("rows"):
        bad = sum(r[-1] != "ok" for r in sections["check"]["rows"])
        out.append(("Triton int = fake (codes, tolerance)", f"{bad} failing layer(s)", bad == 0))
    return out


def document(header, sections, prof):
    lines = ["# GPU check: DiTAS on one GPU", "", *header, "", "## Targets", "", "| target | measured | met |",
             "|---|---:|---|", *(f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in targets(sections, prof))]
    for i, (name, s) in enumerate(sections.items(), 1):
        status = s["status"] + (f": {s['error']}" if s.get("error") else "")
        lines += ["", f"## {i}. {TITLES[name]} (`{name}`: {status}, {s['seconds']:.1f} s)", ""]
        if s.get("rows"):
            lines += ["| " + " | ".join(s["columns"]) + " |", "|---" * len(s["columns"]) + "|",
                      *("| " + " | ".join(map(str, r)) + " |" for r in s["rows"]), ""]
        lines += s.get("notes", [])
    return lines


def run_section(fn, ctx, cap):
    """fn(ctx) with its status ("ok", or "failed" and the error's one line) and seconds, stopped after cap s."""
    def stop(signum, frame):
        raise TimeoutError(f"stopped at its time cap of {cap:.0f} s")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(max(1, int(cap)))
    t0 = time.perf_counter()
    try:
        out = {"status": "ok", **fn(ctx)}
    except Exception as err:  # reported, and the next section runs
        out = {"status": "failed", "error": f"{type(err).__name__}: {first_line(err)}"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    out["seconds"] = time.perf_counter() - t0
    return out


def run_sections(names, fns, ctx, time_limit, write):
    """Run the named sections in order, each capped by CAPS and by what is left of time_limit; write(results)
    after each."""
    deadline, results = time.perf_counter() + time_limit, {}
    for name in names:
        left = min(CAPS[name], deadline - time.perf_counter())
        results[name] = (run_section(fns[name], ctx, left) if left >= 5 else
                         {"status": "skipped", "error": f"the {time_limit:.0f} s time guard", "seconds": 0.0})
        print(f"{name}: {results[name]['status']} ({results[name]['seconds']:.1f} s)", file=sys.stderr, flush=True)
        write(results)
    return results


def environment(prof, args):
    triton = "not importable"
    try:
        import triton as _t
        triton = _t.__version__
    except Exception:
        pass
    dev = (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if prof.device == "cuda" else
           f"CPU only, dry run: Triton's interpreter, {prof.model}; the timings measure nothing")
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "device": dev,
            "torch": torch.__version__, "triton": triton, "python": platform.python_version(),
            "host": f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} thread(s)"}


def main(args):
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read when quant.kernels.ops_triton imports triton (not yet imported)
    elif not torch.cuda.is_available():
        raise UserError("no CUDA device: bench/gpu.py runs on a GPU (--dry-run runs it on CPU with tiny shapes)")
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not names or any(s not in SECTIONS for s in names):
        raise UserError(f"--sections {args.sections}: a comma list of {', '.join(SECTIONS)}")
    prof = DRY if args.dry_run else GPU
    out = args.out or os.path.join(ROOT, "bench", "results", "gpu-dry-run.md" if args.dry_run else "gpu.md")
    cli.check_writable(out, "--out")
    args.threads = threads.set_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    torch.manual_seed(0)
    env = environment(prof, args)
    header = [f"`python bench/gpu.py {' '.join(sys.argv[1:])}`, {env['date']}", "",
              f"{env['device']}; torch {env['torch']}, triton {env['triton']}, Python {env['python']}; host "
              f"{env['host']}."]

    def write(results):  # after each section: what finished survives a kill
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write("\n".join(document(header, results, prof)) + "\n")
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump({"env": env, "profile": asdict(prof), "sections": results,
                       "targets": targets(results, prof)}, f, indent=1)

    ctx = types.SimpleNamespace(prof=prof, work=os.path.abspath(args.work), threads=args.threads)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # a killed run stops its subprocesses too
    results = run_sections(names, FUNCTIONS, ctx, args.time_limit, write)
    write_report(out, document(header, results, prof))
    failed = [n for n, r in results.items() if r["status"] != "ok"]
    if failed:
        raise UserError(f"section(s) {', '.join(failed)} did not finish: see {out}")


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton's interpreter (a smoke run)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--time-limit", type=float, default=450.0, help="seconds for all sections together")
    p.add_argument("--out", help="the report (and .json); default bench/results/gpu.md, gpu-dry-run.md with --dry-run")
    p.add_argument("--work", default=os.path.join(ROOT, "results", "gpu"), help="checkpoints, samples and logs")
    threads.add_threads_arg(p)
    return p


if __name__ == "__main__":
    cli.run(main, build_parser().parse_args())
