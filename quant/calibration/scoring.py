"""The alpha search's scorings: how the calibration driver (quant/calibration/driver.py) gathers pass 1's statistics
and scores each layer's candidates (docs/METHOD.md §4, §5), behind one protocol, `Scoring`.

    exact      (the paper's search) pass 1 gathers the TAS maxima once for every layer; one more FP loop per group
               streams every step's FP input through every candidate (quant/search/candidates.py AlphaSearch)
    shortlist  (the ditas search's) pass 1, per group, gathers the approximate search's statistics; each layer's
               candidates are ranked by the predicted loss and the `search_shortlist` best kept; one more FP loop
               scores those exactly
    approx     pass 1, per group, gathers the same statistics; every loss is predicted from them
               (quant/search/approx.py), no second FP loop

The FP loops a scoring runs are its feed's (Feed.runs counts them).
"""
from dataclasses import replace
from typing import Callable, Protocol

import torch

from quant.calibration.feed import as_feed, collect_statistics
from quant.method.smoothing import RunningAbsMax
from quant.search.approx import DEFAULT_TOKEN_SAMPLES, InputStats, approx_losses
from quant.search.candidates import AlphaSearch, Candidates, Scores


class Scoring(Protocol):
    """One way to search alpha, as the driver's phases 1 and 3 run it. say(line): the progress printer, its lines
    opening with the driver's "calibration k/3, " and group prefix."""

    def statistics(self, layers: dict, feed, say: Callable) -> dict:
        """Pass 1 before the groups: {name: statistic or None} of `layers` ({name: nn.Linear}, this rank's), over
        feed's FP loop where it runs one; {} where each group gathers its own (group_statistics)."""

    def group_statistics(self, part: dict, feed, stats: dict, say: Callable) -> dict:
        """{name: statistic or None} of one group's layers `part`: pass 1's `stats`, or one FP loop over `feed`."""

    def prune(self, name: str, candidates: Candidates, statistic) -> Candidates:
        """The candidates kept of one layer, right after they are prepared (the others are freed)."""

    def score(self, layers: dict, candidates: dict, baselines: dict, stats: dict, loop) -> dict:
        """{name: Scores} of `layers`' candidates and round-to-nearest baselines ({name: Candidates} each); loop: the
        group's Feed, or a loop of this process."""


class ExactScoring:
    """Pass 2 (the paper's search): every candidate scored on every calibration step's FP input."""

    def __init__(self, cfg):
        self.cfg = cfg

    def statistics(self, layers, feed, say):
        if self.cfg.smoothing == "none":  # nothing to smooth: no statistics, no loop
            return {name: None for name in layers}
        say(f"TAS statistics: one FP sampling loop, {feed.observing()}")
        return collect_statistics(layers, feed, RunningAbsMax)

    def group_statistics(self, part, feed, stats, say):
        return stats

    def prune(self, name, candidates, statistic):
        return candidates

    def score(self, layers, candidates, baselines, stats, loop):
        """{name: Scores} from a streaming FP loop over `layers`. Shared by chunks, every rank scores every layer
        of the round on its chunks (the candidates sent to every rank first, the running sums back to the
        owners)."""
        cfg, acfg = self.cfg, self.cfg.act_cfg()
        feed = as_feed(loop, layers)
        # shared without the FP weight and bias (up to 21 MB a layer at DiT-XL/2): every rank has the model
        bare = feed.share({name: (candidates[name].on(None, None), baselines[name].on(None, None))
                           for name in layers})
        every = {name: tuple(c.on(feed.modules[name].weight, feed.modules[name].bias) for c in pair)
                 for name, pair in bare.items()}
        engine = dict(matmul_dtype=cfg.search_dtype, row_stride=cfg.search_row_stride)
        n = feed.loop.chunks
        searches = {name: AlphaSearch(c, acfg, cfg.search_steps, slots=n, **engine) for name, (c, _) in every.items()}
        # plain round-to-nearest on the same inputs: the "before smoothing, before LoRA" error
        rtn = {name: AlphaSearch(b, acfg, cfg.search_steps, slots=n, **engine) for name, (_, b) in every.items()}

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


class ApproxScoring:
    """The approximate search: pass 1, per group, gathers InputStats (the TAS maxima among them) and the losses are
    predicted from them; one FP loop. Its report adds each alpha's weight and activation terms
    (search_losses_weight_term / _act_term); output_error and output_error_rtn are the predicted per-step losses.
    """

    def __init__(self, cfg, token_samples=DEFAULT_TOKEN_SAMPLES):
        self.cfg, self.token_samples = cfg, token_samples

    def statistic(self):
        """A fresh per-layer statistic of pass 1."""
        return InputStats(self.cfg.act_cfg().granularity, max_steps=self.cfg.search_steps,
                          token_samples=self.token_samples)

    def statistics(self, layers, feed, say):
        return {}

    def group_statistics(self, part, feed, stats, say):
        """One FP loop gathering the approximate search's statistics (and the TAS maxima)."""
        say(f"TAS and loss statistics: one FP sampling loop, {feed.observing()}")
        return collect_statistics(part, feed, self.statistic)

    def prune(self, name, candidates, statistic):
        return candidates

    def score(self, layers, candidates, baselines, stats, loop):
        """{name: Scores} predicted from pass 1's statistics (no FP loop)."""
        acfg, out = self.cfg.act_cfg(), {}
        for name, cands in candidates.items():
            st = stats[name]
            losses, wterm, nterm = approx_losses(cands, st, acfg)
            rtn = approx_losses(baselines[name], st, acfg)[0][0]
            out[name] = Scores(losses, st.steps, rtn, st.steps,
                               {"search_losses_weight_term": wterm, "search_losses_act_term": nterm})
        return out


class ShortlistScoring(ApproxScoring):
    """The default search of the ditas scheme (beyond the paper): pass 1 as the approximate search's; right after a
    layer's candidates are prepared they are ranked by the predicted loss and only the `search_shortlist` best are
    kept (the others freed); pass 2 scores those exactly, as ExactScoring does, and the best of them wins. Equal to
    the exact search wherever its winner is on the shortlist (bench/results/candidate_fits.md); the report keeps
    every alpha's prediction."""

    def __init__(self, cfg):
        super().__init__(cfg)
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


SCORINGS: dict[str, Callable[..., Scoring]] = {"exact": ExactScoring, "shortlist": ShortlistScoring,
                                              "approx": ApproxScoring}  # by QuantConfig.search
