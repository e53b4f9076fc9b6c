"""bench/scale.py's tables: its runs, the projection, the probe, and two runs compared layer by layer from
their QuantDiT.py output directories (python bench/scale.py --compare A B)."""
import json
import os
import statistics

from bench.scale_memory import CALIB_ROWS, GIB, MIB
from quant.errors import UserError


PROJECTION_COLUMNS = ["scheme", "image px", "tokens", "steps", "FP model GiB", "search state GiB", "activations GiB",
                      "largest at", "projected peak GiB", "host: per-step ranges GiB", "load peak GiB",
                      "measured peak GiB", "measured as"]
PROJECTION_NOTE = (
    "projected peak = FP model + the largest layer group's search state that QuantDiT plans in this memory "
    "(quant/calibration/budget.py's formulas, held to the bytes held by tests/test_budget.py; one layer's transient shortlist "
    "candidates included) + activations: the larger of one block forward's float32 tensors (max(7 D, 3 D + 2 H) per "
    "token row; SDPA: no tokens x tokens matrix; the probe checks it) and, at each quantized layer's input, the "
    "tensors live there plus its search workspace (quant/calibration/budget.py's workspace_bytes, an estimate not measured "
    "here). On CUDA the shortlist's per-step activation ranges are kept in pinned host memory (host column); on the "
    "CPU they are in the state. load peak = loading --ckpt: download._load_file's whole state dict and the model it "
    "is copied into. Neither counts the interpreter nor the quantized layers built last.")


def projection_cells(r):
    return [r["scheme"], r["px"], r["tokens"], r["steps"], gib(r["model"]), gib(r["state"], 3),
            gib(r["activations"], 3), r["where"], gib(r["projected"]), gib(r["host"]), gib(r["load"]),
            gib(r.get("measured")), r.get("measured_as", "-")]


PROBE_COLUMNS = ["forward", "tokens", "predicted MiB", "first call MiB", "repeat MiB", "repeat / predicted", "s"]


def gib(b, digits=2):
    return "n/a" if b is None else f"{b / GIB:.{digits}f}"


def md_table(cols, rows):
    return ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


COLUMNS = ["scheme", "TAS statistics s", "candidates s", "alpha search s", "build layers s", "total s (report)",
           "process wall s", "process CPU s", "peak RSS GiB", "peak CUDA GiB", "search state max group GiB",
           "search state total GiB", "SVDs", "FP passes", "groups", "CPU stolen by the host %"]


def run_cells(scheme, run):
    report = run["report"] or {}
    t, c = report.get("timings") or {}, report.get("calibration") or {}
    secs = [("n/a" if t.get(k) is None else f"{t[k]:.1f}") for k in
            ("tas_statistics_s", "prepare_candidates_s", "alpha_search_s", "build_layers_s", "total_s")]
    svds = "n/a" if c.get("svds") is None else f"{c['svds']} ({c.get('svd', '?')})"
    return [scheme if run["exit"] == 0 else f"{scheme} (failed: exit {run['exit']})", *secs, f"{run['wall_s']:.1f}",
            f"{run['cpu_s']:.1f}", gib(run["peak_rss_bytes"]), gib(c.get("peak_cuda_bytes")),
            gib(c.get("state_bytes_max"), 3), gib(c.get("state_bytes_total"), 3), svds,
            *(c.get(k, "n/a") for k in ("fp_passes", "groups")),
            "n/a" if run.get("stolen_share") is None else f"{100 * run['stolen_share']:.0f}"]


def document(args, header, runs, proj, probe):
    doc = [f"# QuantDiT.py at scale: {args.model}, random weights", "", *header, "",
           *md_table(COLUMNS, [run_cells(s, r) for s, r in runs.items()]), "",
           f"Projection to the paper's calibration batch ({CALIB_ROWS} rows of tokens: 16 labels x 2 for guidance):",
           "", *md_table(PROJECTION_COLUMNS, [projection_cells(r) for r in proj]), "", PROJECTION_NOTE, ""]
    if probe is None:
        return doc + ["Probe: skipped (--no-probe)."]
    rows = [[what, r["tokens"], *(f"{r[k] / MIB:.1f}" for k in ("predicted_bytes", "first_bytes", "repeat_bytes")),
             f"{r['repeat_bytes'] / max(r['predicted_bytes'], 1):.2f}", f"{r['s']:.1f}"]
            for what, key in (("whole model", "full"), ("one block", "block")) for r in probe[key]]
    return doc + [f"Probe: the activation model vs the rise of the peak RSS of forward-only passes (CPU, batch "
                  f"{CALIB_ROWS}, {args.threads} thread(s), glibc's mmap threshold 64 KiB; baseline after importing "
                  f"torch {gib(probe['baseline_rss_bytes'])} GiB):", "", *md_table(PROBE_COLUMNS, rows)]


# ---------------------------------------------------------------- two runs compared (--compare)

def load_layers(qdir):
    path = os.path.join(qdir, "report.json")
    try:
        with open(path) as f:
            return json.load(f)["layers"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a QuantDiT report ({type(e).__name__}: {e})")


def compare(a, b):
    """{layers, equal_alpha, output_error (B/A - 1 per layer), shared_losses (|B/A - 1| at alphas both scored)}."""
    if a.keys() != b.keys():
        raise UserError(f"the reports have other layers ({len(a)} and {len(b)}, "
                         f"{len(a.keys() ^ b.keys())} in one only)")
    ratios = [b[n]["output_error"] / a[n]["output_error"] - 1 for n in a]
    shared = [abs(b[n]["search_losses"][k] / a[n]["search_losses"][k] - 1)
              for n in a for k in a[n]["search_losses"] if k in b[n]["search_losses"]]
    return {"layers": len(a), "equal_alpha": sum(a[n]["alpha"] == b[n]["alpha"] for n in a),
            "output_error": ratios, "shared_losses": shared}


def compare_table(c, name_a, name_b):
    """compare()'s markdown table: equal alphas, B's output error over A's - 1 (mean, min / max), the relative
    difference of the losses at shared alphas (median / max)."""
    pct = lambda x: f"{100 * x:+.2f}%"  # noqa: E731
    oe, sl = c["output_error"], c["shared_losses"]
    return ["| A | B | layers | equal alpha | output error B/A - 1, mean (min / max) | "
            "loss at shared alphas, abs(B/A - 1) median / max (pairs) |",
            "|---|---|---:|---:|---|---|",
            f"| {name_a} | {name_b} | {c['layers']} | {c['equal_alpha']} | {pct(statistics.mean(oe))} "
            f"({pct(min(oe))} / {pct(max(oe))}) | {100 * statistics.median(sl):.2f}% / {100 * max(sl):.2f}% "
            f"({len(sl)}) |"]
