"""bench/quality.py's rows: their names on the command line (W4A8:ditas:approx, W8A8:ditas), the study's rows
(one per setting and method, every draw), the main table, what each component buys (paired differences), the
fake-vs-int backend check, and the figure of FID-digits and PSNR vs bit width."""
import argparse

from bench.study import METHODS, fmt, log, mean_std, parse_bits, pyplot

LABELS = {"fixed": "SmoothQuant alpha 0.5 (TAS statistic, no LoRA)"}  # the study's names where METHODS' differ


def bits_name(bits):
    return f"W{bits[0]}A{bits[1]}"


def parse_extra(spec):
    """'W4A8:ditas:approx' -> ((4, 8), 'ditas', 'approx')."""
    try:
        b, scheme, method = spec.split(":")
    except ValueError:
        raise argparse.ArgumentTypeError(f"an extra row looks like W4A8:ditas:approx, got {spec!r}") from None
    if scheme not in ("ditas", "reference") or method not in METHODS:
        raise argparse.ArgumentTypeError(f"{spec!r}: scheme ditas|reference, method one of {', '.join(METHODS)}")
    return parse_bits(b), scheme, method


def parse_check(spec):
    """'W8A8:ditas' -> ((8, 8), 'ditas')."""
    b, _, scheme = spec.partition(":")
    if scheme not in ("ditas", "reference"):
        raise argparse.ArgumentTypeError(f"a backend check looks like W8A8:ditas, got {spec!r}")
    return parse_bits(b), scheme


def study_rows(results, settings, extra, draws):
    """Row dicts in table order: real, FP, then per bit width and scheme the methods and extra rows."""
    sampling = [s for _, s in draws]
    rows = [{"key": "real", "setting": "data", "label": "real digits (N drawn from the reference per seed)",
             "per_draw": [results[("real", s)] for s in sampling]},
            {"key": "FP", "setting": "FP", "label": "FP", "per_draw": [results[("fp", s)] for s in sampling]}]
    for bits, scheme, methods in settings:
        for method in methods:
            per = [results[("q", bits, scheme, method, cs, s, "fake")] for cs, s in draws]
            rows.append({"key": f"{bits_name(bits)} {scheme} {method}", "setting": f"{bits_name(bits)} {scheme}",
                         "bits": list(bits), "scheme": scheme, "method": method,
                         "label": LABELS.get(method, METHODS[method][0]), "per_draw": per,
                         "extra": (bits, scheme, method) in extra})
    rtn = {(tuple(r["bits"]), r["scheme"]): r for r in rows if r.get("method") == "rtn"}
    for r in rows:
        base = rtn.get((tuple(r["bits"]), r["scheme"])) if "bits" in r else None
        if base is not None and r is not base:
            r["fid_minus_rtn"] = [a["fid"] - b["fid"] for a, b in zip(r["per_draw"], base["per_draw"])]
    return rows


def cell_of(values, digits=2, scale=1.0):
    return fmt([v for v in values if v is not None], digits, scale) if any(v is not None for v in values) else "-"


def main_table(rows):
    lines = ["| setting | method | FID-digits ↓ | FID − RTN (paired) | IS-digits ↑ | classified as label ↑ | "
             "PSNR vs FP (dB) ↑ | calibration (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ps = r["per_draw"]
        lines.append(
            f"| {r['setting']} | {r['label']} | {cell_of([p['fid'] for p in ps])} | "
            f"{cell_of(r['fid_minus_rtn']) if 'fid_minus_rtn' in r else '-'} | {cell_of([p['is'] for p in ps])} | "
            f"{cell_of([p['label_acc'] for p in ps], 1, 100)} % | {cell_of([p.get('psnr') for p in ps])} | "
            f"{cell_of([p.get('calibration_s') for p in ps], 0)} |")
    return "\n".join(lines)


# What one component buys: row a minus row b of the same setting, paired within each draw.
COMPONENTS = [("TAS smoothing at alpha 0.5", "fixed", "rtn"), ("layer-wise alpha search", "search", "fixed"),
              ("LoRA branch (rank 32)", "ditas", "search"), ("all of DiTAS", "ditas", "rtn"),
              ("approximate instead of exact search", "approx", "ditas"),
              ("per-token instead of per-row activations", "token", "ditas"),
              ("adaLN linears quantized too (weight-only 8-bit)", "adaln", "ditas"),
              ("SVD-first branch instead of residual LoRA", "svd", "ditas"),
              ("SVD-first branch instead of residual LoRA, per-token", "svd-token", "token"),
              ("per-token instead of per-row, SVD-first", "svd-token", "svd"),
              ("SVD-first + per-token against DiTAS", "svd-token", "ditas"),
              ("Hadamard rotation of proj/fc2 inputs", "had", "ditas"),
              ("Hadamard rotation, per-token", "had-token", "token"),
              ("Hadamard rotation, SVD-first", "had-svd", "svd"),
              ("Hadamard rotation, SVD-first + per-token", "had-svd-token", "svd-token"),
              ("SVD-first instead of residual LoRA, Hadamard", "had-svd", "had"),
              ("SVD-first instead of residual LoRA, Hadamard + per-token", "had-svd-token", "had-token"),
              ("per-token instead of per-row, Hadamard + SVD-first", "had-svd-token", "had-svd"),
              ("all three against DiTAS", "had-svd-token", "ditas"),
              ("SVD-first instead of residual LoRA, rank 4", "svd-r4", "r4"),
              ("all three at rank 4 against DiTAS at rank 4", "had-svd-token-r4", "r4")]


def components_table(rows):
    """Per setting and component: FID and PSNR differences paired within draws, and in how many draws each
    difference is an improvement (lower FID, higher PSNR)."""
    by = {(tuple(r["bits"]), r["scheme"], r["method"]): r["per_draw"] for r in rows if "bits" in r}
    lines = ["| setting | component (rows compared) | Δ FID-digits | FID better in | Δ PSNR vs FP (dB) | "
             "PSNR better in |", "|---|---|---|---|---|---|"]
    summary = []
    for bits, scheme in dict.fromkeys((b, s) for b, s, _ in by):
        for name, a, b in COMPONENTS:
            if (bits, scheme, a) not in by or (bits, scheme, b) not in by:
                continue
            pa, pb = by[(bits, scheme, a)], by[(bits, scheme, b)]
            dfid = [x["fid"] - y["fid"] for x, y in zip(pa, pb)]
            dpsnr = [x["psnr"] - y["psnr"] for x, y in zip(pa, pb)]
            setting = f"{bits_name(bits)} {scheme}"
            lines.append(f"| {setting} | {name} ({a} − {b}) | {fmt(dfid)} | {sum(d < 0 for d in dfid)}/{len(dfid)} "
                         f"| {fmt(dpsnr)} | {sum(d > 0 for d in dpsnr)}/{len(dpsnr)} |")
            summary.append({"setting": setting, "component": name, "rows": [a, b], "d_fid": dfid, "d_psnr": dpsnr})
    return "\n".join(lines), summary


def backend_table(results, checks, calib_seed, seeds):
    lines = ["| setting | sampling seed | FID-digits, fake | FID-digits, int | int − fake | PSNR vs FP, fake | "
             "PSNR vs FP, int | PSNR int vs fake (dB) |", "|---|---|---|---|---|---|---|---|"]
    summary = []
    for bits, scheme in checks:
        diffs = []
        for s in seeds:
            f = results[("q", bits, scheme, "ditas", calib_seed, s, "fake")]
            i = results[("q", bits, scheme, "ditas", calib_seed, s, "int")]
            diffs.append(i["fid"] - f["fid"])
            lines.append(f"| {bits_name(bits)} {scheme} DiTAS | {s} | {f['fid']:.2f} | {i['fid']:.2f} | "
                         f"{i['fid'] - f['fid']:+.2f} | {f['psnr']:.2f} | {i['psnr']:.2f} | {i['psnr_vs_fake']:.2f} |")
        fids = [results[("q", bits, scheme, "ditas", calib_seed, s, "fake")]["fid"] for s in seeds]
        summary.append({"setting": f"{bits_name(bits)} {scheme}", "int_minus_fake": mean_std(diffs),
                        "fake_seed_spread": mean_std(fids)})
    return "\n".join(lines), summary


def figure(rows, path):
    """FID-digits and PSNR vs FP against bit width (weights at A8, activations at W4), one line per method."""
    plt = pyplot()
    if plt is None:
        log("matplotlib not installed: no figure")
        return None
    table = {(tuple(r["bits"]), r["scheme"], r["method"]): r for r in rows if "bits" in r}
    fp = mean_std([p["fid"] for p in rows[1]["per_draw"]])[0]
    axes_def = [("weight bits (A8)", [(w, 8) for w in (3, 4, 8)]), ("activation bits (W4)", [(4, a) for a in (4, 6, 8)])]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    methods = sorted({k[2] for k in table}, key=list(METHODS).index)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {m: cycle[i % len(cycle)] for i, m in enumerate(methods)}  # more methods than colors: they repeat
    for col, (xlabel, points) in enumerate(axes_def):
        for row, (metric, ylabel) in enumerate((("fid", "FID-digits ↓"), ("psnr", "PSNR vs FP (dB) ↑"))):
            ax = axes[row, col]
            xs = set()
            for scheme, style, marker in (("ditas", "-", "o"), ("reference", "--", "s")):
                for m in methods:
                    pts = [(b, table[(b, scheme, m)]) for b in points if (b, scheme, m) in table]
                    if not pts:  # a row at one bit width only (an extra row) is a lone marker
                        continue
                    x = [b[0] if col == 0 else b[1] for b, _ in pts]
                    ms = [mean_std([p[metric] for p in r["per_draw"]]) for _, r in pts]
                    xs.update(x)
                    ax.errorbar(x, [v[0] for v in ms], yerr=[v[1] for v in ms], linestyle=style, marker=marker,
                                fillstyle="full" if scheme == "ditas" else "none", color=colors[m], capsize=3,
                                label=f"{scheme}: {LABELS.get(m, METHODS[m][0])}")
            if metric == "fid":
                ax.axhline(fp, color="black", linewidth=0.8, linestyle=":", label="FP")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_xticks(sorted(xs))
            ax.grid(alpha=0.3)
    legend = {}  # every panel's lines (a row at one setting only shows in one panel), once each
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, h)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=2, fontsize=7)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
