"""The FP calibration loop in chunks (quant/calibration/feed.py): lockstep sampling, per-chunk statistics and
search sums merged in chunk order, and what a chunked calibration equals."""
import pytest
import torch

from helpers import random_dit
from diffusion.sampling import make_lockstep_sampler, make_sampler, sample_inputs
from quant.search.approx import InputStats
from quant.calibration.driver import collect_statistics, quantize_dit
from quant.quant_config import QuantConfig
from quant.calibration.feed import ChunkedLoop, Feed, merge
from quant.method.layers import quantizable_layers
from quant.search.candidates import AlphaSearch, Candidates
from quant.method.smoothing import RunningAbsMax


def chunked_loop(model, steps, n, chunks):
    """quantize_dit's loop over n labels (seed 1, cfg 1.5) in `chunks` equal chunks, as QuantDiT.py builds it."""
    sampler = make_lockstep_sampler(model, steps, 1.5, clip_denoised=True)
    size = n // chunks

    def run(indices):
        batches = [sample_inputs(1, range(c * size, (c + 1) * size), 10, (3, 8, 8),
                                 [i % 10 for i in range(c * size, (c + 1) * size)]) for c in indices]
        sampler([(z, y, gens) for gens, y, z in batches])
    return ChunkedLoop(run, chunks)


def test_lockstep_sampling_is_each_batch_sampled_alone():
    model = random_dit()
    one = make_sampler(model, 3, 1.5, clip_denoised=True)
    both = make_lockstep_sampler(model, 3, 1.5, clip_denoised=True)
    inputs = lambda a: sample_inputs(1, range(a, a + 2), 10, (3, 8, 8), [a, a + 1])  # noqa: E731 (fresh streams)
    together = both([(z, y, gens) for gens, y, z in map(inputs, (0, 2))])
    for a, out in zip((0, 2), together):
        gens, y, z = inputs(a)
        assert torch.equal(one(z, y, gens), out)  # the same noise, the same shapes: the same samples


def test_every_layer_sees_each_chunk_once_per_step_in_order():
    model = random_dit()
    layers = quantizable_layers(model)
    feed = Feed.local(chunked_loop(model, 3, 4, 2), layers)
    seen = []
    feed.run(lambda name, chunk, x: seen.append((name, chunk, x.shape[0])))
    first = next(iter(layers))
    assert [(c, b) for n, c, b in seen if n == first] == [(0, 4), (1, 4)] * 3  # 2 samples, doubled by CFG
    assert len(seen) == 3 * 2 * len(layers)


def test_merged_chunk_statistics_are_the_whole_batch_statistics():
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(4, 5, 16, generator=g) for _ in range(3)]
    whole, parts = InputStats("row", dtype=torch.float64), [InputStats("row", dtype=torch.float64) for _ in range(2)]
    tas, tas_parts = RunningAbsMax(), [RunningAbsMax(), RunningAbsMax()]
    for x in steps:
        whole.update(x)
        tas.update(x)
        for c in range(2):
            parts[c].update(x[2 * c:2 * c + 2])
            tas_parts[c].update(x[2 * c:2 * c + 2])
    m = merge(parts)
    assert torch.equal(m.absmax, whole.absmax) and torch.equal(merge(tas_parts).value, tas.value)
    torch.testing.assert_close(m.xtx, whole.xtx, rtol=1e-12, atol=1e-12)
    assert m.steps == 6 and sum(m.rows) == sum(whole.rows)  # one update per chunk and step
    # per-row ranges: the same rows' ranges, chunk after chunk
    got = torch.cat([torch.stack(list(m.cmax))[:3], torch.stack(list(m.cmax))[3:]], 1)
    assert torch.equal(got, torch.stack(list(whole.cmax)))
    assert merge(parts[:1]) is parts[0]


def test_search_slots_add_in_order_and_travel():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 32, generator=g)
    from quant.quant_config import WeightQuantConfig
    cands = Candidates(w, None, torch.rand(32, generator=g) + 0.5, [0.3, 0.6], WeightQuantConfig(bits=4, group_size=16),
                       lora_rank=0)
    acfg = QuantConfig().act_cfg()
    xs = [torch.randn(6, 32, generator=g) for _ in range(4)]
    a, b = AlphaSearch(cands, acfg, slots=2), AlphaSearch(cands, acfg, slots=2)
    for k, x in enumerate(xs):
        a.update(x, slot=k % 2)
        if k % 2 == 0:
            b.update(x, slot=0)
    other = AlphaSearch(cands, acfg, slots=2)
    for k, x in enumerate(xs):
        if k % 2:
            other.update(x, slot=1)
    b.set_slot(1, other.slot(1))  # the slot filled by another process
    assert a.losses == b.losses and a.steps == b.steps == 4
    one = AlphaSearch(cands, acfg)
    for x in xs:
        one.update(x)
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(one.losses), rtol=1e-12, atol=0)


def test_chunked_calibration_matches_the_whole_batch():
    """Equal chunks: the losses are means per update, so the calibration of 2 chunks is the whole batch's
    up to the FP model's rounding on smaller GEMMs."""
    cfg = QuantConfig(group_size=32, lora_rank=4, lora_iters=2, smoothing="search", alpha_step=0.25)
    reports = {}
    for chunks in (1, 2):
        model = random_dit()
        reports[chunks] = quantize_dit(model, cfg, chunked_loop(model, 3, 4, chunks), progress=False)
    assert reports[2]["calibration"]["fp_chunks"] == 2
    for name, one in reports[1]["layers"].items():
        two = reports[2]["layers"][name]
        assert two["search_steps"] == one["search_steps"] == 3
        assert two["alpha"] == one["alpha"], name
        for key in ("output_error", "output_error_rtn"):
            assert two[key] == pytest.approx(one[key], rel=1e-4), (name, key)


def test_chunks_need_per_row_ranges():
    model = random_dit()
    cfg = QuantConfig(scheme="reference", group_size=32, lora_rank=4, lora_iters=2, smoothing="search", alpha_step=0.5)
    with pytest.raises(ValueError, match="needs activation ranges per row or token"):
        quantize_dit(model, cfg, chunked_loop(model, 2, 4, 2), progress=False)
    with pytest.raises(ValueError, match="positive integer"):
        ChunkedLoop(lambda indices: None, 0)


def test_statistics_of_a_plain_loop_are_one_chunk():
    model = random_dit()
    layers = quantizable_layers(model)
    calls = []
    stats = collect_statistics(layers, lambda: calls.append(1) or model(
        torch.zeros(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])), RunningAbsMax)
    assert calls == [1] and set(stats) == set(layers) and all(s.steps == 1 for s in stats.values())
