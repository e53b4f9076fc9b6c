"""Data-free calibration and quantization of a DiT (docs/METHOD.md §2-§5, §8, §13): the one driver.

Every statistic the method needs is a running max or sum over denoising steps, accumulated by
forward pre-hooks while the full-precision model samples a fixed noise batch (`loop`); no step's
activations are kept. The phases of quantize_dit, each named after the paper's step:

    1. TAS statistics       pass 1: a_j = max over steps and rows of |X_t[:, j]| per layer (§3)
                            (the shortlist and approximate searches gather their loss statistics
                            with it, in each group's pass)
    2. candidate prep       per layer and alpha: smoothing factors, quantized weight, LoRA (§4, §5);
                            the shortlist keeps each layer's best predicted candidates only
    3. alpha search         a Scoring (quant/calibration/scoring.py): exact = a pass streams every step's FP
                            input through every candidate (quant/search/candidates.py); shortlist (the ditas
                            default) = the same pass over the kept candidates; approx = predicted from the
                            statistics (quant/search/approx.py; shortlist and approx are beyond the paper)
    4. layers and report    each layer becomes the QuantLinear of its best alpha; with bias_correction (beyond
                            the paper, quant/calibration/bias.py) one more FP loop first moves every chosen
                            layer's mean output error into its bias (on rank 0)
    5. smoothing select     (beyond the paper, quant/calibration/select.py) phases 2-4 once per option of
                            cfg.options() (no smoothing, fixed alphas), each option's quantized model run
                            through the calibration loop on rank 0; the option ending nearest the FP loop's
                            samples is kept

Phases 2 and 3 run per group of layers whose search state fits the memory budget
(quant/calibration/budget.py), each group over its own FP loop of the same fixed noise, so the result does
not depend on the budget. The loop may run the noise batch in chunks (quant/calibration/feed.py: one update
per chunk and step). Under torchrun each rank calibrates its share of the layers
(quant/calibration/ranks.py), the FP loops run by every rank or divided among them (quant/calibration/feed.py), and rank
0 builds the model. With quantize_adaln, 5.: every block's adaLN
linear, weight-only 8-bit.
"""
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

import torch
from tqdm.auto import tqdm

from quant.calibration.bias import mean_output_errors
from quant.calibration.budget import human, layer_cost, plan_groups
from quant.calibration.feed import ChunkedLoop, Feed, by_chunks, collect_statistics
from quant.method.layers import ADALN_WEIGHT_CFG, adaln_layers, check_layers, quantizable_layers
from quant.nn.qlinear import QuantLinear
from quant.method.quantizer import dequantize_weight
from quant.calibration.ranks import Ranks
from quant.calibration.scoring import SCORINGS
from quant.calibration.select import as_samples, end_to_end_psnr, final_samples, option_label, swapped
from quant.search.candidates import Candidates, quantize_linear, select_alpha
from quant.method.smoothing import RunningAbsMax
from quant.method.rotation import rotate_dit


PHASES = ("tas_statistics_s", "prepare_candidates_s", "alpha_search_s", "build_layers_s")


@dataclass(frozen=True)
class Run:
    """One calibration's progress lines and wall time per phase. say(line): the progress printer (a no-op without
    progress); progress: show the candidate bars too; prefix: the lines' group ("group 2/3, "); timings: seconds
    per phase (PHASES), charged by `phase`; _open: the phases running (a phase opened in another pauses it)."""
    say: Callable
    progress: bool = True
    prefix: str = ""
    phases: int = 3  # numbered in the progress lines (4 with the bias correction)
    timings: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    _open: list = field(default_factory=list, repr=False)

    def line(self, phase, text):
        """Print the progress line of phase 1..phases."""
        self.say(f"calibration {phase}/{self.phases}, {self.prefix}{text}")

    @contextmanager
    def phase(self, name):
        """Charge the wall time inside to timings[name], less that of the phases opened inside it."""
        now = time.time()
        if self._open:
            self.timings[self._open[-1][0]] += now - self._open[-1][1]
        self._open.append([name, now])
        try:
            yield
        finally:
            now = time.time()
            self.timings[name] += now - self._open.pop()[1]
            if self._open:
                self._open[-1][1] = now


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
    (quant/method/fold.py) rescales its output rows through the per-row scales exactly. Returns
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


def calibrate_group(part, cfg, scoring, stats, feed, run):
    """Phases 2 and 3 for one group of layers ({name: nn.Linear}) over the round's feed
    (quant/calibration/feed.py); stats: pass 1's (scoring.group_statistics gathers the group's own where it
    does); timed and printed through `run`. Returns {name: (LayerQuant, report entry)}; the group's candidates
    are freed on return."""
    if not part and not feed.by_chunks:  # a loop shared by chunks needs every rank, with layers or none
        return {}
    with run.phase("tas_statistics_s"):
        stats = scoring.group_statistics(part, feed, stats, partial(run.line, 1))
    absmax = {n: None if stats[n] is None or cfg.smoothing == "none" else stats[n].value for n in part}

    lora = f"LoRA rank {cfg.lora_rank}, {cfg.lora_iters} iterations, {cfg.svd} SVD" if cfg.lora_rank else "no LoRA"
    if cfg.lora_rank and cfg.lora_order == "svd_first":
        lora = f"rank-{cfg.lora_rank} SVD of the smoothed weight before quantization, {cfg.svd} SVD"
    kept = f", the {cfg.search_shortlist} best predicted kept" if cfg.search == "shortlist" else ""
    run.line(2, f"candidate preparation: {len(cfg.alphas())} alpha(s) x {len(part)} layers ({lora}{kept})")

    def prune(name, cands):  # the shortlist's ranking is part of the search: timed as phase 3
        with run.phase("alpha_search_s"):
            return scoring.prune(name, cands, stats[name])
    with run.phase("prepare_candidates_s"):  # 2. smoothing, quantized weights, LoRA per alpha
        candidates, baselines = prepare_candidates(part, cfg, absmax, run.progress, prune)

    what = {"exact": "one more FP sampling loop scores every candidate" if len(cfg.alphas()) > 1 else
                     "one alpha, nothing to search: one more FP sampling loop measures its output error",
            "shortlist": f"one more FP sampling loop scores the shortlisted candidates ({cfg.search_shortlist} "
                         "per layer)",
            "approx": "losses predicted from the statistics (no FP loop)"}[cfg.search]
    run.line(3, f"alpha search: {what}")
    with run.phase("alpha_search_s"):  # 3. score the candidates
        scores = scoring.score(part, candidates, baselines, stats, feed)
    return {n: layer_report(candidates[n], scores[n], baselines[n], stats[n], feed.loop.chunks) for n in part}


def plan_calibration(model, cfg, memory_budget=None, ranks=None, device_type=None, chunks=1, loop_shape=None):
    """(this rank's layer names, their groups, {name: estimated state bytes}) before any work is done:
    ValueError for a config that does not fit some layer, more ranks than layers, a memory budget
    below one layer's state (on every rank, when one rank's share does not fit; the FP loops divided
    by chunks, each rank holds every rank's groups of a round), or an FP loop in chunks
    (quant/calibration/feed.py) with activation ranges per tensor. device_type: where the model will
    calibrate (default: where it is). loop_shape: each chunk's quant.calibration.feed.LoopShape (None: unknown)."""
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


def calibrate_layers(layers, cfg, stats, loop, ranks, rank_groups, passes, estimated, run):
    """Phases 2 and 3 of this rank's share, group by group, every rank taking part in every round: ({name:
    (LayerQuant, report entry)}, this rank's memory record). passes: the FP loops run so far (pass 1);
    estimated: the share's planned state bytes."""
    scoring = SCORINGS[cfg.search](cfg)
    groups = rank_groups[ranks.rank]
    n_groups = max(len(gs) for gs in rank_groups)
    divided = by_chunks(ranks.world, loop.chunks)
    chosen, state_max = {}, 0
    for g in range(n_groups):
        part = {n: layers[n] for n in (groups[g] if g < len(groups) else [])}
        group = replace(run, prefix=run.prefix + (f"group {g + 1}/{n_groups}, " if n_groups > 1 else ""))
        feed = Feed(loop, ranks, layers, [gs[g] if g < len(gs) else [] for gs in rank_groups])
        results = ranks.together(lambda: calibrate_group(part, cfg, scoring, stats, feed, group))
        chosen.update(results)
        passes += feed.runs
        held = sum(entry["state_bytes"] for _, entry in results.values())
        if divided:  # every rank held the whole round's statistics and candidates
            held = sum(ranks.all(held))
        state_max = max(state_max, held)
    device = next(iter(layers.values())).weight.device
    return chosen, {"rank": ranks.rank, "fp_passes": passes, "fp_chunks": loop.chunks, "fp_by_chunks": divided,
                    "groups": len(groups), "state_bytes_max": state_max,
                    "state_bytes_estimated": estimated,
                    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    "peak_cuda_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                    "timings": dict(run.timings)}


def build_layers(layers, cfg, every, loop, device, run):
    """Rank 0, phase 4: ({name: QuantLinear of the layer's best candidate}, the per-layer report, the FP loop's final
    samples or None) from every rank's calibrate_layers result; with bias_correction one more FP loop (the FP layers
    still in place) first moves every layer's mean output error into its bias, and its final samples come back."""
    chosen = {n: r for part in every for n, r in part["layers"].items()}
    report = {name: chosen[name][1] for name in layers}
    with run.phase("build_layers_s"):  # 4. the best candidate of every layer
        built = {name: QuantLinear.from_search(chosen[name][0].to(device), cfg.act_cfg()) for name in layers}
    if cfg.bias_correction:  # 4a. mean output errors into the biases
        run.line(4, "bias correction: one more FP sampling loop measures every quantized layer's mean output error")
        run.timings.setdefault("bias_correction_s", 0.0)
        samples = []  # the loop's own final samples, kept (smoothing select compares with them)
        recorded = ChunkedLoop(lambda indices: samples.append(loop.run(indices)) or samples[-1], loop.chunks,
                               loop.shape)
        with run.phase("bias_correction_s"):
            mus = mean_output_errors(layers, built, recorded)
            for name, mu in mus.items():
                built[name].lower_bias(mu)
            # the report's two numbers per layer, read back in one transfer (no host sync per layer)
            summary = torch.stack([torch.stack([mu.pow(2).mean().sqrt(), mu.abs().max()]) for mu in mus.values()])
            for name, (rms, peak) in zip(mus, summary.tolist()):
                report[name]["bias_correction"] = {"mean_error_rms": rms, "mean_error_max": peak}
        return built, report, samples[0]
    return built, report, None


def quantize_dit(model, cfg, loop, progress=True, memory_budget=None, ranks=None):
    """Calibrate on `loop` (a callable running one FP sampling loop of model, or a quant.calibration.feed.ChunkedLoop)
    and swap in QuantLinears.

    cfg: a QuantConfig. memory_budget: bytes of search state this process may hold (None: no limit,
    one group); a budget below one layer's state is a ValueError naming the layer and the minimum.
    ranks: quant.calibration.ranks.Ranks (default: this process alone); with several, every rank must call this
    with the same arguments; each calibrates its share (the FP loops divided among them where the
    loop's chunks are a multiple of the ranks: quant/calibration/feed.py), rank 0 swaps every layer and returns the
    report, the others return None. The report: per layer alpha, search losses, weight errors
    before/after LoRA, output errors (mean squared error per step, and plain round-to-nearest's for
    reference), SVDs and state bytes; wall time per phase; the calibration's passes, groups, state
    and peak memory (`calibration`). With smoothing select (quant/calibration/select.py) phases 2-4 run once per
    option (cfg.options()), the loop must return its final samples, and `selection` reports each option's
    end-to-end PSNR and the one kept, whose layers the report describes.
    """
    ranks = ranks or Ranks()
    loop = ChunkedLoop.of(loop)
    if cfg.hadamard:  # the FP model rotated in place (the same function): calibration sees the rotated inputs
        rotate_dit(model)
    layers = quantizable_layers(model)
    options = cfg.options()
    selecting = cfg.smoothing == "select"
    lead = next((o for o in options if o.smoothing != "none"), options[0])  # the statistics the options need
    device = next(model.parameters()).device
    run = Run(tqdm.write if progress else (lambda msg: None), progress,
              phases=3 + cfg.bias_correction + selecting)
    mine, groups, estimates = plan_calibration(model, lead, memory_budget, ranks, chunks=loop.chunks,
                                               loop_shape=loop.shape)
    rank_groups = ranks.all(groups)  # every rank's groups: who observes which layer in each round
    divided = by_chunks(ranks.world, loop.chunks)  # the FP loops divided by chunks (quant/calibration/feed.py)
    where = f" on rank {ranks.rank} of {ranks.world}" if ranks.world > 1 else ""
    budget = "no memory budget" if memory_budget is None else f"a budget of {memory_budget / 2 ** 30:g} GiB"
    feed = Feed(loop, ranks, layers, [[n for g in gs for n in g] for gs in rank_groups])
    how = f", {'divided among' if divided else 'each run by'} the processes" if ranks.world > 1 else ""
    fp = "" if loop.chunks == 1 else f"; FP loops in {loop.chunks} chunks{how}"
    held = ", each process holding every rank's in a round" if divided else ""
    chose = f"; smoothing select: {len(options)} options in turn" if selecting else ""
    run.say(f"calibration: {len(mine)} layers{where} in {len(groups)} group(s) ({budget}; estimated search state "
            f"{human(sum(estimates.values()))} in all{held}{fp}{chose})")
    with run.phase("tas_statistics_s"):  # 1. TAS statistics before the groups, where the scoring gathers them so
        stats = ranks.together(lambda: SCORINGS[lead.search](lead).statistics({n: layers[n] for n in mine}, feed,
                                                                              partial(run.line, 1)))
    passes = feed.runs
    if selecting:
        run.timings["selection_s"] = 0.0

    kept, scored, mems, fp_passes, reference = None, [], [], passes, None
    for i, option in enumerate(options):  # 2.-4. per option (one, unless smoothing select)
        orun = replace(run, prefix=f"option {i + 1}/{len(options)} ({option_label(option)}), ") if selecting else run
        chosen, mem = calibrate_layers(layers, option, stats, loop, ranks, rank_groups, passes,
                                       sum(estimates.values()), orun)
        every = ranks.gather({"layers": chosen, "memory": mem}, device=device)  # rank 0 builds the model
        if every is None:
            continue
        built, report, fp_samples = build_layers(layers, option, every, loop, device, orun)
        mems.append([part["memory"] for part in every])
        fp_passes += max(m["fp_passes"] for m in mems[-1]) - passes + option.bias_correction  # rank 0's correction
        psnr = None
        if selecting:  # 5. the option's quantized calibration loop against the FP loop's samples
            run.line(run.phases, f"{orun.prefix}end to end: its quantized calibration loop against the FP loop")
            if reference is None and fp_samples is not None:  # the FP loop's final samples: the correction's
                reference = as_samples(fp_samples)
            elif reference is None:  # or, without it, one more FP loop
                with run.phase("selection_s"):
                    reference = final_samples(loop)
                fp_passes += 1
            with run.phase("selection_s"), swapped(model, built):
                psnr = end_to_end_psnr(final_samples(loop), reference)
            scored.append({"smoothing": option.smoothing, "alpha": None if option.smoothing == "none"
                           else option.alpha, "end_to_end_psnr_db": psnr})
            if kept is not None and psnr <= kept[3]:
                continue
            if device.type == "cuda" and i + 1 < len(options):  # one option's layers on the device at a time
                built = {n: m.cpu() for n, m in built.items()}
        kept = (option, built, report, psnr, mems[-1])
    if kept is None:
        return None
    option, built, report, _, ranks_mem = kept
    for name in layers:
        model.set_submodule(name, built.pop(name).to(device))
    every_mem = [m for ms in mems for m in ms]
    timings = run.timings
    out = {"layers": report, "timings": timings, "calibration": {
        "ranks": ranks.world, "device": str(device), "budget_bytes": memory_budget, "svd": cfg.svd,
        "svds": sum(r["svds"] for r in report.values()),
        "fp_passes": fp_passes,
        "groups": max(m["groups"] for m in ranks_mem),
        "state_bytes_max": max(m["state_bytes_max"] for m in every_mem),
        "state_bytes_total": sum(r["state_bytes"] for r in report.values()),
        "state_bytes_estimated": sum(m["state_bytes_estimated"] for m in ranks_mem),
        "peak_rss_bytes": max(m["peak_rss_bytes"] for m in every_mem),
        "peak_cuda_bytes": None if device.type != "cuda" else max(m["peak_cuda_bytes"] for m in every_mem),
        "per_rank": ranks_mem}}
    out["calibration"].update(search=cfg.search, fp_chunks=loop.chunks, fp_by_chunks=divided)
    if selecting:
        out["selection"] = {"options": scored, "kept": options.index(option)}
        psnrs = ", ".join(f"{option_label(o)} {s['end_to_end_psnr_db']:.2f} dB" for o, s in zip(options, scored))
        run.say(f"smoothing select: kept {'no smoothing' if option.smoothing == 'none' else option_label(option)} "
                f"(the calibration loop's end-to-end PSNR against FP: {psnrs})")
    if cfg.quantize_adaln:  # 5. adaLN, weight-only
        run.say("adaLN linears: weight-only 8-bit")
        timings["quantize_adaln_s"] = 0.0
        with run.phase("quantize_adaln_s"):
            out["adaln_layers"] = quantize_adaln(model)
    return out
