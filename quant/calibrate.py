"""Data-free calibration and quantization of a DiT (docs/METHOD.md §2-§5, §8): the one driver.

Every statistic the method needs is a running max or sum over denoising steps, accumulated by
forward pre-hooks while the full-precision model samples a fixed noise batch (`loop`); no step's
activations are kept. The phases of quantize_dit, each named after the paper's step:

    1. TAS statistics       pass 1: a_j = max over steps and rows of |X_t[:, j]| per layer (§3)
                            (the approximate search also gathers its loss statistics here)
    2. candidate prep       per layer and alpha: smoothing factors, quantized weight, LoRA (§4, §5)
    3. alpha search         scoring: exact = pass 2 streams every step's FP input through every
                            candidate (quant/search.py); approx = predicted from pass 1
                            (quant/approx_search.py, beyond the paper)
    4. layers and report    each layer becomes the QuantLinear of its best alpha
    5. adaLN                with quantize_adaln: every block's adaLN linear, weight-only 8-bit

Two FP sampling loops in all (one with the approximate search), whatever the depth.
"""
import time

import torch
from tqdm.auto import tqdm

from quant.approx_search import ApproxScoring
from quant.layers import ADALN_WEIGHT_CFG, adaln_layers, check_layers, quantizable_layers
from quant.qlinear import QuantLinear
from quant.quantizer import dequantize_weight
from quant.search import AlphaSearch, Candidates, Scores, quantize_linear, select_alpha
from quant.smoothing import RunningAbsMax


class ExactScoring:
    """Pass 2 (the paper's search): every candidate scored on every calibration step's FP input."""
    loops = 2

    def __init__(self, cfg):
        self.cfg = cfg

    def statistic(self):
        return RunningAbsMax()

    def score(self, layers, candidates, baselines, stats, loop):
        """{name: Scores} from a streaming FP loop over `layers` ({name: nn.Linear})."""
        cfg, acfg = self.cfg, self.cfg.act_cfg()
        engine = dict(matmul_dtype=cfg.search_dtype, row_stride=cfg.search_row_stride)
        searches = {name: AlphaSearch.over(c, acfg, cfg.search_steps, **engine) for name, c in candidates.items()}
        # plain round-to-nearest on the same inputs: the "before smoothing, before LoRA" error
        rtn = {name: AlphaSearch.over(c, acfg, cfg.search_steps, **engine) for name, c in baselines.items()}

        def observe(name, x):
            searches[name].update(x)
            rtn[name].update(x)

        run_hooked(layers, observe, loop)
        return {name: Scores(s.losses, s.steps, rtn[name].losses[0], rtn[name].steps, {})
                for name, s in searches.items()}


SCORINGS = {"exact": ExactScoring, "approx": ApproxScoring}


def run_hooked(layers, fn, loop):
    """Run loop() with fn(name, x) observing every layer's input ({name: module}); hooks are always removed."""
    def hook(name):
        def observe(module, inputs):
            fn(name, inputs[0])  # returning None leaves the input untouched
        return observe
    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in layers.items()]
    try:
        with torch.no_grad():
            loop()
    finally:
        for h in handles:
            h.remove()


def collect_statistics(layers, loop, make):
    """Pass 1: {name: statistic} with statistic = make() updated on every step's input of the layer."""
    stats = {name: make() for name in layers}
    run_hooked(layers, lambda name, x: stats[name].update(x), loop)
    return stats


def collect_tas(layers, loop):
    """Pass 1 of the exact search: the temporal-aggregated channel max a_j of every layer's input."""
    return {name: s.value for name, s in collect_statistics(layers, loop, RunningAbsMax).items()}


def prepare_candidates(layers, cfg, absmax, progress=True):
    """({name: Candidates} for cfg's alphas, {name: Candidates} of plain round-to-nearest)."""
    wcfg, alphas = cfg.weight_cfg(), cfg.alphas()
    candidates, baselines = {}, {}
    for name, lin in tqdm(layers.items(), desc="candidates (smoothing, quantization, LoRA fits)", unit="layer",
                          disable=not progress, leave=False):
        candidates[name] = Candidates(lin.weight, lin.bias, absmax[name], alphas, wcfg, cfg.lora_rank,
                                      cfg.lora_iters, svd=cfg.svd)
        baselines[name] = Candidates(lin.weight, lin.bias, None, [None], wcfg, lora_rank=0)
    return candidates, baselines


def layer_report(cands, scores):
    """(LayerQuant of the best alpha, the layer's report entry); losses per step, as searched."""
    k = select_alpha(scores.losses, cands.alphas)
    best = cands.layer(k)
    steps = max(scores.steps, 1)
    per_alpha = lambda values: {str(a): v / steps for a, v in zip(cands.alphas, values)}  # noqa: E731
    return best, {
        "alpha": best.alpha,
        "search_losses": per_alpha(scores.losses),
        **{key: per_alpha(values) for key, values in scores.extra.items()},
        "weight_error_before_lora": best.weight_error_rtn,
        "weight_error_after_lora": best.weight_error_lora,
        "lora_errors": best.lora_errors,
        "output_error": scores.losses[k] / steps,
        "output_error_rtn": scores.rtn_loss / max(scores.rtn_steps, 1),
        "search_steps": scores.steps,
    }


@torch.no_grad()
def quantize_adaln(model):
    """Replace every block's adaLN linear by a weight-only QuantLinear (ADALN_WEIGHT_CFG: 8-bit, ditas
    scheme, one scale per output channel, round-to-nearest; no smoothing, no LoRA, float activations).

    Its input is SiLU(c), one vector per sample, so there is nothing to smooth or search; folding
    (quant/fold.py) rescales its output rows through the per-row scales exactly. Returns
    {name: {"weight_error", "weight_rel_error"}} (Frobenius norms).
    """
    report = {}
    for name, lin in adaln_layers(model).items():
        if isinstance(lin, QuantLinear):
            continue
        q = quantize_linear(lin, None, None, ADALN_WEIGHT_CFG, None, lora_rank=0)
        err = float(torch.linalg.matrix_norm(lin.weight.float() - dequantize_weight(q.qweight)))
        report[name] = {"weight_error": err,
                        "weight_rel_error": err / max(float(torch.linalg.matrix_norm(lin.weight.float())), 1e-30)}
        model.set_submodule(name, q.to(lin.weight.device))
    return report


def quantize_dit(model, cfg, loop, progress=True):
    """Calibrate on `loop` (a callable running one FP sampling loop of model) and swap in QuantLinears.

    cfg: a QuantConfig. Returns the report: per layer alpha, search losses, weight errors
    before/after LoRA, output errors (mean squared error per step, and plain round-to-nearest's for
    reference); wall time per phase.
    """
    layers = quantizable_layers(model)
    check_layers(layers, cfg)
    scoring = SCORINGS[cfg.search](cfg)
    timings = {}
    say = tqdm.write if progress else (lambda msg: None)

    t0 = time.time()  # 1. TAS statistics (the exact search with no smoothing needs none)
    stats = {name: None for name in layers}
    if cfg.smoothing != "none" or scoring.loops == 1:
        say(f"calibration 1/3, TAS statistics: one FP sampling loop, {len(layers)} layers observed")
        stats = collect_statistics(layers, loop, scoring.statistic)
    else:
        say("calibration 1/3, TAS statistics: not needed (--smoothing none)")
    absmax = {name: None if s is None or cfg.smoothing == "none" else s.value for name, s in stats.items()}
    timings["tas_statistics_s"] = time.time() - t0

    t0 = time.time()  # 2. candidate preparation: smoothing, quantized weights, LoRA per alpha
    lora = f"LoRA rank {cfg.lora_rank}, {cfg.lora_iters} iterations" if cfg.lora_rank else "no LoRA"
    say(f"calibration 2/3, candidate preparation: {len(cfg.alphas())} alpha(s) x {len(layers)} layers ({lora})")
    candidates, baselines = prepare_candidates(layers, cfg, absmax, progress)
    timings["prepare_candidates_s"] = time.time() - t0

    t0 = time.time()  # 3. alpha search: score every candidate
    say("calibration 3/3, alpha search: " + ("one more FP sampling loop scores every candidate" if scoring.loops == 2
                                            else "losses predicted from pass 1's statistics (no FP loop)"))
    scores = scoring.score(layers, candidates, baselines, stats, loop)
    timings["alpha_search_s"] = time.time() - t0

    t0 = time.time()  # 4. the best candidate of every layer, and the report
    report = {}
    for name in layers:
        best, report[name] = layer_report(candidates[name], scores[name])
        model.set_submodule(name, QuantLinear.from_search(best, cfg.act_cfg()))
    timings["build_layers_s"] = time.time() - t0
    out = {"layers": report, "timings": timings}
    if scoring.loops == 1:
        out.update(search=cfg.search, calibration_loops=1)
    if cfg.quantize_adaln:  # 5. adaLN, weight-only
        say("adaLN linears: weight-only 8-bit")
        t0 = time.time()
        out["adaln_layers"] = quantize_adaln(model)
        timings["quantize_adaln_s"] = time.time() - t0
    return out
