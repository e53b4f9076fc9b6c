"""QuantDiT.py's quantization flags: QuantConfig's fields on the command line (their defaults and help come from
quant/quant_config.py), the QuantConfig a command line builds, and the output directory named after it."""
import argparse
import os
from dataclasses import fields

from quant.errors import UserError
from quant.io.storage import DEFAULT_STORAGE_DTYPE
from quant.quant_config import (CALIB_CLIPS, DEFAULT_SHORTLIST, LORA_ORDERS, SCHEME_DEFAULT, SEARCHES, SMOOTHINGS,
                                QuantConfig, alpha_grid, field_default)


def add_quant_args(parser):
    """The QuantConfig flags; defaults (and their help) come from quant/quant_config.py."""
    q = field_default
    parser.add_argument("--weight-bit", type=int, default=q("weight_bit"), help="weight bits, 2..8")
    parser.add_argument("--act-bit", type=int, default=q("act_bit"), help="activation bits, 2..8")
    parser.add_argument("--scheme", choices=("ditas", "reference"), default=q("scheme"),
                        help="ditas: deployable integer form; reference: the released code's numerics "
                             "(docs/METHOD.md §8)")
    parser.add_argument("--group-size", type=int, default=q("group_size"),
                        help="ditas weight group size along the input dim; 0 = per output channel")
    parser.add_argument("--act-granularity", choices=("tensor", "row", "token"), default=None,
                        help=f"dynamic activation ranges (default: {q('act_granularity', 'ditas')} for ditas, "
                             f"{q('act_granularity', 'reference')} for reference)")
    parser.add_argument("--smoothing", choices=SMOOTHINGS, default=None,
                        help=f"search: the paper's layer-wise alpha grid search; fixed: TAS at --alpha (implied by "
                             f"--alpha); none: no smoothing; select: each of --select-from calibrated in turn, the "
                             f"one whose quantized calibration loop ends nearest the FP one kept (docs/METHOD.md "
                             f"§16) (default: {q('smoothing', 'ditas')} for ditas, with bias correction: steadier "
                             f"over calibration draws, docs/METHOD.md §15; {q('smoothing', 'reference')} for "
                             f"reference)")
    parser.add_argument("--alpha", type=float, default=None,
                        help=f"fixed smoothing exponent in [0, 1] (implies --smoothing fixed; "
                             f"default {q('alpha', 'ditas')})")
    parser.add_argument("--select-from", nargs="+", type=select_option, default=list(q("select_from")),
                        metavar="OPTION", help=f"--smoothing select: the options, each 'none' or a fixed alpha "
                                               f"(default: {' '.join(map(str, q('select_from')))})")
    parser.add_argument("--alpha-step", type=float, default=q("alpha_step"),
                        help="--smoothing search: the alpha grid's spacing")
    parser.add_argument("--lora-rank", type=int, default=q("lora_rank"), help="0 disables the LoRA branch")
    parser.add_argument("--lora-iters", type=int, default=q("lora_iters"),
                        help="alternating quantize / low-rank fit iterations")
    parser.add_argument("--lora-order", choices=LORA_ORDERS, default=q("lora_order"),
                        help="residual: the LoRA branch fits the quantization residual and is fed the quantized "
                             "activation (the paper); svd_first: the smoothed weight's top --lora-rank singular "
                             "directions are taken out before quantization and run in 16-bit on the smoothed, "
                             "unquantized activation (SVDQuant's order; ditas scheme; quant/method/svd_branch.py)")
    parser.add_argument("--hadamard", action="store_true", default=q("hadamard"),
                        help="rotate the inputs of attn.proj (folded into qkv's V rows) and mlp.fc2 (online, after "
                             "the GELU) by a block Walsh-Hadamard matrix before calibration (quant/method/rotation.py)")
    parser.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                        help=f"one more FP calibration loop after the search moves every quantized layer's mean "
                             f"output error into its bias (quant/calibration/bias.py; docs/METHOD.md §15) (default: "
                             f"{'on' if q('bias_correction', 'ditas') else 'off'} for ditas, "
                             f"{'on' if q('bias_correction', 'reference') else 'off'} for reference)")
    parser.add_argument("--svd", choices=("full", "lowrank", "subspace"), default=None,
                        help=f"truncated SVD of the LoRA fit: full (LAPACK), lowrank (randomized, fresh every "
                             f"iteration) or subspace (warm-started through the alternating loop and from the "
                             f"neighbouring alpha; quant/method/lora.py) (default: {q('svd', 'ditas')} for ditas, "
                             f"{q('svd', 'reference')} for reference, the released code's)")
    parser.add_argument("--search-steps", type=int, default=None,
                        help=f"search loss over the first N calibration steps only (default: all for ditas, "
                             f"{q('search_steps', 'reference')} for reference)")
    parser.add_argument("--search", choices=SEARCHES, default=None,
                        help=f"alpha search loss: exact (a second FP loop scores every candidate, the paper), "
                             f"shortlist (every candidate ranked by the approximate loss of pass 1, the "
                             f"--search-shortlist best scored exactly by the second loop) or approx (predicted "
                             f"from pass 1 alone; quant/search/approx.py) (default: {q('search', 'ditas')} for "
                             f"ditas, {q('search', 'reference')} for reference; exact with one alpha)")
    parser.add_argument("--search-shortlist", type=int, default=None, metavar="K",
                        help=f"--search shortlist: candidates per layer scored exactly (default "
                             f"{DEFAULT_SHORTLIST}; {len(alpha_grid())} = every alpha of the default grid)")
    parser.add_argument("--search-dtype", choices=("fp32", "bf16"), default=q("search_dtype"),
                        help="reference scheme: dtype of the alpha search's candidate products (bf16: 1.6-1.7x "
                             "faster calibration, losses within ~1e-5 relative; see bench/results/calibration.md)")
    parser.add_argument("--search-row-stride", type=int, default=q("search_row_stride"), metavar="N",
                        help="exact/shortlist search: score the candidates on every N-th token row of each step only "
                             "(an approximation, N times less candidate work; ranges still from all rows; "
                             "1 = all rows, the paper)")
    parser.add_argument("--calib-clip", choices=CALIB_CLIPS, default=None,
                        help=f"clip x0 predictions to [-1, 1] in the FP calibration loops; auto: for pixel-space "
                             f"models (--vae none) only, as sampling does (default: {q('calib_clip', 'ditas')} for "
                             f"ditas, {q('calib_clip', 'reference')} for reference, the released code's "
                             f"clip_denoised=False; docs/METHOD.md §8)")
    parser.add_argument("--quantize-adaln", action="store_true", default=q("quantize_adaln"),
                        help="also quantize every block's adaLN linear: weight-only 8-bit per output channel")


def select_option(text):
    """One --select-from option: 'none' or a float (range checked by QuantConfig)."""
    if text == "none":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an option is 'none' or an alpha in [0, 1], got {text!r}") from None


def quant_config_from_args(args):
    """The QuantConfig of the command line: flags left unset take QuantConfig's (scheme) defaults."""
    given = {f.name: getattr(args, f.name) for f in fields(QuantConfig)}
    for flag in ("weight_bit", "act_bit"):  # the message names the flag
        if not 2 <= given[flag] <= 8:
            raise UserError(f"--{flag.replace('_', '-')} {given[flag]}: bits must be an integer in 2..8")
    given["group_size"] = given["group_size"] or None  # 0 = per output channel
    given["select_from"] = tuple(given["select_from"])
    if given["smoothing"] == "select" and given["alpha"] is not None:
        raise UserError("--alpha fixes one alpha; --smoothing select takes its options from --select-from")
    for name in ("act_granularity", "search_steps", "svd", "search", "search_shortlist", "calib_clip",
                 "bias_correction"):  # None: default
        if given[name] is None:
            given[name] = SCHEME_DEFAULT
    try:
        return QuantConfig(**given)
    except ValueError as e:
        raise UserError(str(e)) from None


def default_out_dir(args, cfg):
    """results/<model>-<size>-W<w>A<a>-<scheme>[-ablation...]: one directory per setting (the ablation
    suffixes name what differs from QuantConfig's defaults for the scheme)."""
    changed = cfg.changed()
    parts = [args.model.replace("/", "-"), str(args.image_size), f"W{cfg.weight_bit}A{cfg.act_bit}", cfg.scheme]
    if cfg.smoothing == "none":
        parts.append("rtn")
    elif cfg.smoothing == "fixed" and ("smoothing" in changed or "alpha" in changed):
        parts.append(f"alpha{cfg.alpha:g}")
    elif "smoothing" in changed:
        parts.append(cfg.smoothing)
    if "select_from" in changed:
        parts.append("from" + "-".join(o if o == "none" else f"{o:g}" for o in cfg.select_from))
    if "lora_rank" in changed:
        parts.append(f"r{cfg.lora_rank}")
    if "lora_order" in changed:
        parts.append(cfg.lora_order.replace("_", ""))
    if cfg.hadamard:
        parts.append("hadamard")
    if "bias_correction" in changed:
        parts.append("biascorr" if cfg.bias_correction else "nobiascorr")
    if "act_granularity" in changed:
        parts.append(cfg.act_granularity)
    if cfg.quantize_adaln:
        parts.append("adaln8")
    if "search" in changed:
        parts.append(f"{cfg.search}search")
    if "search_shortlist" in changed and cfg.search_shortlist is not None:
        parts.append(f"short{cfg.search_shortlist}")
    if "svd" in changed:
        parts.append(f"{cfg.svd}svd")
    if "search_row_stride" in changed:
        parts.append(f"rows{cfg.search_row_stride}")
    if "calib_clip" in changed:
        parts.append(f"clip{cfg.calib_clip}")
    if args.storage_dtype != DEFAULT_STORAGE_DTYPE:
        parts.append(args.storage_dtype)
    return os.path.join(args.results_dir, "-".join(parts))
