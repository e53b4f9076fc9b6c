"""Collect evaluator.py --json outputs into one markdown table (scripts/reproduce_paper.sh's last stage).

    python scripts/collect_table.py METRICS_DIR [--out table.md]

Each JSON is one evaluator run. The setting (model, size, steps, cfg, seed, FP or W?A?-scheme) is
read from the sample batch's file name, which sample_merge_TAS.py builds as
<model>-size-<px>-vae-<vae>-cfg-<cfg>-seed-<seed>-steps-<steps>-<fp | W?A?-scheme>.npz;
files whose batch name does not follow it are listed as skipped. Writes an FID overview
(method x size/steps, with the paper's published DiTAS numbers where they exist) and a
table with every metric.
"""
import glob
import json
import os
import re
import sys

from ditas.cli import ArgumentParser, UserError, check_writable
from quant.io.files import atomic_write

NAME = re.compile(r"(?P<model>.+?)-size-(?P<size>\d+)-vae-(?P<vae>.+?)-cfg-(?P<cfg>[0-9.]+)-seed-(?P<seed>\d+)"
                  r"-steps-(?P<steps>\d+)-(?P<method>fp|W\d+A(?:\d+|fp)-[A-Za-z0-9_]+)\.npz$")
# docs/METHOD.md §10: DiT-XL/2, ImageNet, cfg 1.5, FID on 10K samples (ADM suite)
PUBLISHED = {("W4A8-ditas", 256, 50): 9.05, ("W4A8-ditas", 256, 100): 6.86,
             ("W4A8-ditas", 512, 50): 17.92, ("W4A8-ditas", 512, 100): 13.45}
METRICS = (("fid", "FID", 2), ("sfid", "sFID", 2), ("inception_score", "IS", 2), ("precision", "Prec.", 3),
           ("recall", "Rec.", 3))


def read(paths):
    rows, skipped = [], []
    for path in paths:
        try:
            with open(path) as f:
                m = json.load(f)
        except (OSError, ValueError) as e:
            skipped.append(f"{path} ({type(e).__name__})")
            continue
        match = NAME.search(os.path.basename(str(m.get("sample_batch", ""))))
        if not match or "fid" not in m:
            skipped.append(f"{path} (sample_batch {m.get('sample_batch')!r} is not a sample_merge_TAS.py name)")
            continue
        d = match.groupdict()
        rows.append({**m, "model": d["model"], "size": int(d["size"]), "steps": int(d["steps"]),
                     "cfg": float(d["cfg"]), "seed": int(d["seed"]), "method": d["method"], "path": path})
    return rows, skipped


def method_key(method):
    """FP first, then by bits (W8 before W4), then scheme."""
    if method == "fp":
        return (0, 0, "")
    w = int(re.match(r"W(\d+)", method).group(1))
    return (1, -w, method)


def render(rows, skipped=()):
    lines = []
    settings = sorted({(r["size"], r["steps"]) for r in rows})
    methods = sorted({r["method"] for r in rows}, key=method_key)
    by = {(r["method"], r["size"], r["steps"]): r for r in rows}
    features = sorted({r.get("features", "?") for r in rows})
    ns = sorted({r.get("num_samples", "?") for r in rows}, key=str)
    models = sorted({r["model"] for r in rows})
    cfgs = sorted({r["cfg"] for r in rows})
    lines += [f"Models {', '.join(models)}; {', '.join(map(str, ns))} samples; cfg {', '.join(map(str, cfgs))}; "
              f"features: {', '.join(features)}.", "",
              "FID (published DiTAS in parentheses where the paper reports it):", "",
              "| method | " + " | ".join(f"{s}px, {t} steps" for s, t in settings) + " |",
              "|---|" + "---|" * len(settings)]
    comparable = models == ["DiT-XL-2"] and features == ["inception"]
    for meth in methods:
        cells = []
        for s, t in settings:
            r = by.get((meth, s, t))
            cell = "-" if r is None else f"{r['fid']:.2f}"
            pub = PUBLISHED.get((meth, s, t))
            if comparable and pub is not None:
                cell += f" ({pub:.2f})"
            cells.append(cell)
        lines.append(f"| {meth} | " + " | ".join(cells) + " |")
    lines += ["", "All metrics:", "",
              "| size | steps | method | " + " | ".join(m[1] for m in METRICS) + " | samples | metrics file |",
              "|---|---|---|" + "---|" * len(METRICS) + "---|---|"]
    for r in sorted(rows, key=lambda r: (r["size"], r["steps"], method_key(r["method"]))):
        vals = " | ".join(f"{r[k]:.{d}f}" if isinstance(r.get(k), (int, float)) else "-" for k, _, d in METRICS)
        lines.append(f"| {r['size']} | {r['steps']} | {r['method']} | {vals} | {r.get('num_samples', '-')} | "
                     f"{os.path.basename(r['path'])} |")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", nargs="+", help="directories of evaluator JSON files, or JSON files")
    p.add_argument("--out", default=None, help="write the table here as well as to stdout")
    args = p.parse_args(argv)
    if args.out:
        try:
            check_writable(args.out, "--out")
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    paths = []
    for m in args.metrics:
        paths += sorted(glob.glob(os.path.join(m, "*.json"))) if os.path.isdir(m) else [m]
    rows, skipped = read(paths)
    if not rows:
        print(f"error: no evaluator JSON with a sample_merge_TAS.py batch name in {' '.join(args.metrics)}"
              + (f" (skipped: {'; '.join(skipped)})" if skipped else ""), file=sys.stderr)
        return 2
    text = render(rows, skipped)
    if args.out:
        atomic_write(args.out, lambda f: f.write(text), mode="w")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
