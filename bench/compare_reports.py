"""Two calibrations of the same model compared layer by layer, from their QuantDiT.py output directories.

    python bench/compare_reports.py results/scale/DiT-XL-2-32-ditas results/scale/DiT-XL-2-32-ditas-2proc

For runs that should agree but not bit for bit (another thread count, another machine): per layer the
chosen alpha, the output error at it (report.json's output_error: mean squared error per step), and
the search loss of every alpha both runs scored. Prints a markdown table: equal alphas, B's output
error over A's - 1 (mean, min / max), the relative difference of the losses at shared alphas (median
/ max). Exit 2 with one line for a directory without report.json or with other layers.
"""
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ditas import cli  # noqa: E402
from quant.errors import UserError  # noqa: E402


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


def table(c, name_a, name_b):
    pct = lambda x: f"{100 * x:+.2f}%"  # noqa: E731
    oe, sl = c["output_error"], c["shared_losses"]
    return ["| A | B | layers | equal alpha | output error B/A - 1, mean (min / max) | "
            "loss at shared alphas, abs(B/A - 1) median / max (pairs) |",
            "|---|---|---:|---:|---|---|",
            f"| {name_a} | {name_b} | {c['layers']} | {c['equal_alpha']} | {pct(statistics.mean(oe))} "
            f"({pct(min(oe))} / {pct(max(oe))}) | {100 * statistics.median(sl):.2f}% / {100 * max(sl):.2f}% "
            f"({len(sl)}) |"]


def build_parser():
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="QuantDiT.py output directory A")
    p.add_argument("b", help="QuantDiT.py output directory B")
    return p


def main(args):
    c = compare(load_layers(args.a), load_layers(args.b))
    print("\n".join(table(c, args.a, args.b)))


if __name__ == "__main__":
    cli.run(main, build_parser().parse_args())
