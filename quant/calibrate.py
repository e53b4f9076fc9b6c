"""Data-free calibration and quantization of a DiT (docs/METHOD.md §2-§5, §8, §13): the one driver.

Every statistic the method needs is a running max or sum over denoising steps, accumulated by
forward pre-hooks while the full-precision model samples a fixed noise batch (`loop`); no step's
activations are kept. The phases of quantize_dit, each named after the paper's step:

    1. TAS statistics       pass 1: a_j = max over steps and rows of |X_t[:, j]| per layer (§3)
                            (the shortlist and approximate searches gather their loss statistics
                            with it, in each group's pass)
    2. candidate prep       per layer and alpha: smoothing factors, quantized weight, LoRA (§4, §5);
                            the shortlist keeps each layer's best predicted candidates only
    3. alpha search         scoring: exact = a pass streams every step's FP input through every
                            candidate (quant/search.py); shortlist (the ditas default) = the same
                            pass over the kept candidates; approx = predicted from the statistics
                            (quant/approx_search.py; shortlist and approx are beyond the paper)
    4. layers and report    each layer becomes the QuantLinear of its best alpha

Phases 2 and 3 run per group of layers whose search state fits the memory budget
(quant/budget.py), each group over its own FP loop of the same fixed noise, so the result does
not depend on the budget. The loop may run the noise batch in chunks (quant/feed.py: one update
per chunk and step). Under torchrun each rank calibrates its share of the layers
(quant/ranks.py), the FP loops run by every rank or divided among them (quant/feed.py), and rank
0 builds the model. With quantize_adaln, 5.: every block's adaLN
linear, weight-only 8-bit.
"""
import resource
import time
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from quant.approx_search import ApproxScoring, InputStats, approx_losses
from quant.budget import human, layer_cost, plan_groups
from quant.feed import ChunkedLoop, Feed, as_feed, by_chunks, merge
from quant.layers import ADALN_WEIGHT_CFG, adaln_layers, check_layers, quantizable_layers
from quant.qlinear import QuantLinear
from quant.quantizer import dequantize_weight
from quant.ranks import Ranks
from quant.rotation import rotate_dit
from quant.search import AlphaSearch, Candidates, Scores, quantize_linear, select_alpha
from quant.smoothing import RunningAbsMax


class ExactScoring:
    """Pass 2 (the paper's search): every candidate scored on every calibration step's FP input.

    The scoring protocol (ShortlistScoring, approx_search.ApproxScoring): group_statistics (pass 1 runs
    per group of layers, else once for all), scoring_loop (phase 3 runs one more FP loop), statistic()
    (pass 1's per-layer statistic), prune(name, candidates, statistic) (right after a layer's candidates
    are prepared: the ones kept) and score(...)."""
    group_statistics, scoring_loop = False, True

    def __init__(self, cfg):
        self.cfg = cfg

    def statistic(self):
        return RunningAbsMax()

    def prune(self, name, candidates, statistic):
        return candidates

    def score(self, layers, candidates, baselines, stats, loop):
        """{name: Scores} from a streaming FP loop (a Feed, or a loop of this process) over `layers`
        ({name: nn.Linear}, this rank's). Shared by chunks, every rank scores every layer of the round
        on its chunks (the candidates sent to every rank first, the running sums back to the owners)."""
        cfg, acfg = self.cfg, self.cfg.act_cfg()
        feed = as_feed(loop, layers)
        # shared without the FP weight and bias (up to 21 MB a layer at DiT-XL/2): every rank has the model
        bare = feed.share({name: (candidates[name].on(None, None), baselines[name].on(None, None))
                           for name in layers})
        every = {name: tuple(c.on(feed.modules[name].weight, feed.modules[name].bias) for c in pair)
                 for name, pair in bare.items()}
        engine = dict(matmul_dtype=cfg.search_dtype, row_stride=cfg.search_row_stride)
        n = feed.loop.chunks
        searches = {name: AlphaSearch.over(c, acfg, cfg.search_steps, slots=n, **engine)
                    for name, (c, _) in every.items()}
        # plain round-to-nearest on the same inputs: the "before smoothing, before LoRA" error
        rtn = {name: AlphaSearch.over(b, acfg, cfg.search_steps, slots=n, **engine) for name, (_, b) in every.items()}

        def observe(name, chunk, x, y):  # y: the FP layer's output, the candidates' reference (no FP product)
            searches[name].update(x, y, chunk)
            rtn[name].update(x, y, chunk)

        feed.run(observe, outputs=True)
        sums = {name: {c: (searches[name].slot(c), rtn[name].slot(c)) for c in feed.chunks} for name in every}
        for name, parts in feed.to_owners(sums).items():
            for c, (mine, base) in enumerate(parts):
                searches[name].set_slot(c, mine)
                rtn[name].set_slot(c, base)
        return {name: Scores(s.losses, s.steps, rtn[name].losses[0], rtn[name].steps, {},
                             s.engine.nbytes() + rtn[name].engine.nbytes())
                for name, s in searches.items() if name in layers}


class ShortlistScoring:
    """The default search of the ditas scheme (beyond the paper): pass 1, per group of layers, gathers the
    approximate search's statistics (the TAS maxima among them, quant/approx_search.py); right after a
    layer's candidates are prepared they are ranked by the predicted loss and only the
    `search_shortlist` best are kept (the others freed); pass 2 scores those exactly, as ExactScoring
    does, and the best of them wins. Equal to the exact search wherever its winner is on the shortlist
    (bench/results/candidate_fits.md); the report keeps every alpha's prediction."""
    group_statistics, scoring_loop = True, True

    def __init__(self, cfg):
        self.cfg = cfg
        self.exact = ExactScoring(cfg)
        self.predicted = {}

    def statistic(self):
        # float32 X^T X: it only ranks candidates for the exact pass (half the memory and time of float64)
        return InputStats(self.cfg.act_cfg().granularity, max_steps=self.cfg.search_steps, dtype=torch.float32)

    def prune(self, name, candidates, statistic):
        """The shortlist of one layer's candidates; its statistic keeps only the TAS maxima (the rest is no
        longer needed)."""
        losses = approx_losses(candidates, statistic, self.cfg.act_cfg())[0]
        alphas = candidates.alphas
        self.predicted[name] = dict(zip(alphas, losses))
        statistic.release()
        keep = sorted(range(len(alphas)), key=lambda k: (losses[k], -1.0 if alphas[k] is None else alphas[k]))
        return candidates.subset(sorted(keep[:self.cfg.search_shortlist]))

    def score(self, layers, candidates, baselines, stats, loop):
        scores = self.exact.score(layers, candidates, baselines, stats, loop)
        return {name: replace(s, predicted=self.predicted.pop(name)) for name, s in scores.items()}


SCORINGS = {"exact": ExactScoring, "shortlist": ShortlistScoring, "approx": ApproxScoring}


def collect_statistics(layers, loop, make):
    """Pass 1: {name: statistic} of this rank's `layers`, statistic = make() updated on every step's
    input of the layer (one per chunk of the batch, merged in chunk order); loop: a Feed or a loop."""
    feed = as_feed(loop, layers)
    parts = {name: {c: make() for c in feed.chunks} for name in feed.observed}
    feed.run(lambda name, chunk, x: parts[name][chunk].update(x))
    return {name: merge(p) for name, p in feed.to_owners(parts).items()}


def collect_tas(layers, loop):
    """Pass 1 of the exact search: the temporal-aggregated channel max a_j of every layer's input."""
    return {name: s.value for name, s in collect_statistics(layers, loop, RunningAbsMax).items()}


def prepare_candidates(layers, cfg, absmax, progress=True, prune=None):
    """({name: Candidates} for cfg's alphas, {name: Candidates} of plain round-to-nearest). prune(name,
    candidates): the candidates kept, called right after each layer's are prepared (the rest freed
    before the next layer's)."""
    wcfg, alphas = cfg.weight_cfg(), cfg.alphas()
    candidates, baselines = {}, {}
    for name, lin in tqdm(layers.items(), desc="candidates (smoothing, quantization, LoRA fits)", unit="layer",
                          disable=not progress, leave=False):
        cands = Candidates(lin.weight, lin.bias, absmax[name], alphas, wcfg, cfg.lora_rank, cfg.lora_iters,
                           svd=cfg.svd, lora_order=cfg.lora_order)
        candidates[name] = cands if prune is None else prune(name, cands)
        del cands
        baselines[name] = Candidates(lin.weight, lin.bias, None, [None], wcfg, lora_rank=0)
    return candidates, baselines


def layer_report(cands, scores, baseline=None, statistic=None, chunks=1):
    """(LayerQuant of the best alpha, the layer's report entry); losses per update (a step's, or a chunk's
    of `chunks`: equal chunks give the step's mean), as searched. The entry's state_bytes: what the
    layer's search held between steps (candidates, baseline, operands, statistic)."""
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
        "search_steps": scores.steps // chunks,
        **({} if scores.predicted is None else
           {"search_losses_predicted": {str(a): v / steps for a, v in scores.predicted.items()}}),
        "svds": cands.svds,
        "state_bytes": cands.nbytes() + (0 if baseline is None else baseline.nbytes()) + scores.operand_bytes
        + (0 if statistic is None else statistic.nbytes()),
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


def calibrate_group(part, cfg, scoring, stats, feed, timings, say, of="", progress=True):
    """Phases 2 and 3 for one group of layers ({name: nn.Linear}); stats: pass 1's, None where the scoring
    gathers its statistics per group (here); feed: the round's (quant/feed.py). Adds to `timings`; returns
    ({name: (LayerQuant, report entry)}, FP loops run). The group's candidates are freed on return."""
    if not part and not feed.by_chunks:  # a loop shared by chunks needs every rank, with layers or none
        return {}, 0
    loops = 0
    t0 = time.time()
    if scoring.group_statistics:  # the approximate search's statistics (and the TAS maxima) in one loop
        say(f"calibration 1/3, {of}TAS and loss statistics: one FP sampling loop, {feed.observing()}")
        stats = collect_statistics(part, feed, scoring.statistic)
        loops += 1
    absmax = {n: None if stats[n] is None or cfg.smoothing == "none" else stats[n].value for n in part}
    timings["tas_statistics_s"] += time.time() - t0

    t0 = time.time()  # 2. candidate preparation: smoothing, quantized weights, LoRA per alpha
    lora = f"LoRA rank {cfg.lora_rank}, {cfg.lora_iters} iterations, {cfg.svd} SVD" if cfg.lora_rank else "no LoRA"
    if cfg.lora_rank and cfg.lora_order == "svd_first":
        lora = f"rank-{cfg.lora_rank} SVD of the smoothed weight before quantization, {cfg.svd} SVD"
    kept = f", the {cfg.search_shortlist} best predicted kept" if cfg.search == "shortlist" else ""
    say(f"calibration 2/3, {of}candidate preparation: {len(cfg.alphas())} alpha(s) x {len(part)} layers "
        f"({lora}{kept})")
    ranking = [0.0]

    def prune(name, cands):  # the shortlist's ranking is part of the search: timed as phase 3
        t = time.time()
        kept = scoring.prune(name, cands, stats[name])
        ranking[0] += time.time() - t
        return kept
    candidates, baselines = prepare_candidates(part, cfg, absmax, progress, prune)
    timings["prepare_candidates_s"] += time.time() - t0 - ranking[0]

    t0 = time.time()  # 3. alpha search: score the candidates
    what = {"exact": "one more FP sampling loop scores every candidate",
            "shortlist": f"one more FP sampling loop scores the shortlisted candidates ({cfg.search_shortlist} "
                         "per layer)",
            "approx": "losses predicted from the statistics (no FP loop)"}[cfg.search]
    say(f"calibration 3/3, {of}alpha search: {what}")
    scores = scoring.score(part, candidates, baselines, stats, feed)
    loops += int(scoring.scoring_loop)
    timings["alpha_search_s"] += time.time() - t0 + ranking[0]
    return {n: layer_report(candidates[n], scores[n], baselines[n], stats[n], feed.loop.chunks) for n in part}, loops


def plan_calibration(model, cfg, memory_budget=None, ranks=None, device_type=None, chunks=1, loop_shape=None):
    """(this rank's layer names, their groups, {name: estimated state bytes}) before any work is done:
    ValueError for a config that does not fit some layer, more ranks than layers, a memory budget
    below one layer's state (on every rank, when one rank's share does not fit; the FP loops divided
    by chunks, each rank holds every rank's groups of a round), or an FP loop in chunks
    (quant/feed.py) with activation ranges per tensor. device_type: where the model will
    calibrate (default: where it is). loop_shape: each chunk's quant.feed.LoopShape (None: unknown)."""
    ranks = ranks or Ranks()
    layers = quantizable_layers(model)
    check_layers(layers, cfg)
    if chunks > 1 and cfg.act_granularity == "tensor":
        raise ValueError(f"an FP loop in {chunks} chunks needs activation ranges per row or token (a tensor's "
                         f"range spans the whole batch): use one chunk or --act-granularity row")
    shapes = {name: tuple(lin.weight.shape) for name, lin in layers.items()}
    device_type = device_type or next(model.parameters()).device.type
    mine = ranks.together(lambda: ranks.share({name: layer_cost(out, inp, cfg) for name, (out, inp) in shapes.items()}))
    divided = by_chunks(ranks.world, chunks)  # each rank then holds every rank's groups of a round
    groups, estimates = ranks.together(lambda: plan_groups(
        {n: shapes[n] for n in mine}, cfg, memory_budget, device_type, holders=ranks.world if divided else 1,
        statistic_slots=chunks // ranks.world if divided else chunks, loop=loop_shape))
    return mine, groups, estimates


def quantize_dit(model, cfg, loop, progress=True, memory_budget=None, ranks=None):
    """Calibrate on `loop` (a callable running one FP sampling loop of model, or a quant.feed.ChunkedLoop)
    and swap in QuantLinears.

    cfg: a QuantConfig. memory_budget: bytes of search state this process may hold (None: no limit,
    one group); a budget below one layer's state is a ValueError naming the layer and the minimum.
    ranks: quant.ranks.Ranks (default: this process alone); with several, every rank must call this
    with the same arguments; each calibrates its share (the FP loops divided among them where the
    loop's chunks are a multiple of the ranks: quant/feed.py), rank 0 swaps every layer and returns the
    report, the others return None. The report: per layer alpha, search losses, weight errors
    before/after LoRA, output errors (mean squared error per step, and plain round-to-nearest's for
    reference), SVDs and state bytes; wall time per phase; the calibration's passes, groups, state
    and peak memory (`calibration`).
    """
    ranks = ranks or Ranks()
    loop = ChunkedLoop.of(loop)
    if cfg.hadamard:  # the FP model rotated in place (the same function): calibration sees the rotated inputs
        rotate_dit(model)
    layers = quantizable_layers(model)
    scoring = SCORINGS[cfg.search](cfg)
    device = next(model.parameters()).device
    say = tqdm.write if progress else (lambda msg: None)
    mine, groups, estimates = plan_calibration(model, cfg, memory_budget, ranks, chunks=loop.chunks,
                                               loop_shape=loop.shape)
    rank_groups = ranks.all(groups)  # every rank's groups: who observes which layer in each round
    n_groups = max(len(gs) for gs in rank_groups)
    divided = by_chunks(ranks.world, loop.chunks)  # the FP loops divided by chunks (quant/feed.py)
    timings = dict.fromkeys(("tas_statistics_s", "prepare_candidates_s", "alpha_search_s", "build_layers_s"), 0.0)
    where = f" on rank {ranks.rank} of {ranks.world}" if ranks.world > 1 else ""
    budget = "no memory budget" if memory_budget is None else f"a budget of {memory_budget / 2 ** 30:g} GiB"
    feed = Feed(loop, ranks, layers, [[n for g in gs for n in g] for gs in rank_groups])
    how = f", {'divided among' if divided else 'each run by'} the processes" if ranks.world > 1 else ""
    fp = "" if loop.chunks == 1 else f"; FP loops in {loop.chunks} chunks{how}"
    held = ", each process holding every rank's in a round" if divided else ""
    say(f"calibration: {len(mine)} layers{where} in {len(groups)} group(s) ({budget}; estimated search state "
        f"{human(sum(estimates.values()))} in all{held}{fp})")
    passes = 0

    t0 = time.time()  # 1. TAS statistics (the exact search with no smoothing needs none)
    stats = {name: None for name in mine}
    if cfg.smoothing != "none" and not scoring.group_statistics:
        say(f"calibration 1/3, TAS statistics: one FP sampling loop, {feed.observing()}")
        stats = ranks.together(lambda: collect_statistics({n: layers[n] for n in mine}, feed, scoring.statistic))
        passes += 1
    timings["tas_statistics_s"] += time.time() - t0

    chosen, state_max = {}, 0
    for g in range(n_groups):  # 2. and 3. per group; every rank takes part in every round
        part = {n: layers[n] for n in (groups[g] if g < len(groups) else [])}
        of = f"group {g + 1}/{n_groups}, " if n_groups > 1 else ""
        feed = Feed(loop, ranks, layers, [gs[g] if g < len(gs) else [] for gs in rank_groups])
        results, loops = ranks.together(lambda: calibrate_group(part, cfg, scoring, stats, feed, timings, say, of,
                                                                progress))
        chosen.update(results)
        passes += loops
        held = sum(entry["state_bytes"] for _, entry in results.values())
        if divided:  # every rank held the whole round's statistics and candidates
            held = sum(ranks.all(held))
        state_max = max(state_max, held)

    mem = {"rank": ranks.rank, "fp_passes": passes, "fp_chunks": loop.chunks, "fp_by_chunks": divided,
           "groups": len(groups), "state_bytes_max": state_max,
           "state_bytes_estimated": sum(estimates.values()),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "peak_cuda_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
           "timings": dict(timings)}
    every = ranks.gather({"layers": chosen, "memory": mem}, device=device)  # rank 0 builds the model
    if every is None:
        return None
    chosen = {n: r for part in every for n, r in part["layers"].items()}

    t0 = time.time()  # 4. the best candidate of every layer, and the report
    report = {}
    for name in layers:
        best, report[name] = chosen[name]
        model.set_submodule(name, QuantLinear.from_search(best.to(device), cfg.act_cfg()))
    timings["build_layers_s"] = time.time() - t0
    ranks_mem = [part["memory"] for part in every]
    out = {"layers": report, "timings": timings, "calibration": {
        "ranks": ranks.world, "device": str(device), "budget_bytes": memory_budget, "svd": cfg.svd,
        "svds": sum(r["svds"] for r in report.values()),
        "fp_passes": max(m["fp_passes"] for m in ranks_mem), "groups": max(m["groups"] for m in ranks_mem),
        "state_bytes_max": max(m["state_bytes_max"] for m in ranks_mem),
        "state_bytes_total": sum(r["state_bytes"] for r in report.values()),
        "state_bytes_estimated": sum(m["state_bytes_estimated"] for m in ranks_mem),
        "peak_rss_bytes": max(m["peak_rss_bytes"] for m in ranks_mem),
        "peak_cuda_bytes": None if device.type != "cuda" else max(m["peak_cuda_bytes"] for m in ranks_mem),
        "per_rank": ranks_mem}}
    out["calibration"].update(search=cfg.search, fp_chunks=loop.chunks, fp_by_chunks=divided)
    if not scoring.scoring_loop:
        out.update(search=cfg.search, calibration_loops=1)
    if cfg.quantize_adaln:  # 5. adaLN, weight-only
        say("adaLN linears: weight-only 8-bit")
        t0 = time.time()
        out["adaln_layers"] = quantize_adaln(model)
        timings["quantize_adaln_s"] = time.time() - t0
    return out
