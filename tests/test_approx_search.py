"""quant/search/approx.py: the one-pass approximate alpha search."""
import pytest
import torch

from helpers import search_problem
from quant.search.approx import InputStats, approx_losses, noise_variance
from quant.calibration.driver import quantize_dit
from quant.quant_config import QuantConfig
from quant.method.layers import quantizable_layers
from quant.nn.qlinear import QuantLinear
from quant.quant_config import ActQuantConfig, WeightQuantConfig
from quant.search.candidates import AlphaSearch

from quant.quant_config import alpha_grid

torch.set_num_threads(1)
RANK, ITERS = 4, 2


def _close(a, b, rtol, atol=0.0):
    """torch.allclose with a message (the first assert_close call costs seconds of lazy imports)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol), (a, b)


def _stats(xs, granularity, **kw):
    st = InputStats(granularity, **kw)
    for x in xs:
        st.update(x)
    return st


def _exact(w, b, xs, absmax, alphas, wcfg, acfg):
    search = AlphaSearch.of_layer(w, b, absmax, alphas, wcfg, acfg, lora_rank=RANK, lora_iters=ITERS)
    for x in xs:
        search.update(x)
    return search


def test_second_moment_is_the_sum_of_xtx_and_tas_max():
    _, _, xs = search_problem(out=64, tokens=6, shift=0.2)
    st = _stats(xs, "row")
    expected = sum(x.reshape(-1, x.shape[-1]).double().T @ x.reshape(-1, x.shape[-1]).double() for x in xs)
    _close(st.xtx, expected, rtol=1e-12, atol=1e-9)
    assert torch.equal(st.absmax, torch.stack([x.abs().amax(dim=(0, 1)) for x in xs]).amax(0))
    assert st.steps == 3 and st.rows == [24, 24, 24]
    assert st.cmin[0].shape == (4, 64)  # per batch row, per channel
    capped = _stats(xs, "tensor", max_steps=2)  # the search's step cap; TAS still sees every step
    assert capped.steps == 2 and capped.seen == 3 and torch.equal(capped.absmax, st.absmax)


@pytest.mark.parametrize("scheme,group_size", [("ditas", 32), ("ditas", None), ("reference", None)])
def test_exact_when_activations_are_not_quantized(scheme, group_size):
    """Without activation quantization the predicted loss is the exact loss (the weight term is exact)."""
    w, b, xs = search_problem(out=64, tokens=6, shift=0.2)
    alphas = [None] + alpha_grid(0.25)
    wcfg = WeightQuantConfig(bits=4, group_size=group_size, scheme=scheme)
    st = _stats(xs, None)
    exact = _exact(w, b, xs, st.absmax, alphas, wcfg, None)
    fresh = AlphaSearch.of_layer(w, b, st.absmax, alphas, wcfg, None, lora_rank=RANK, lora_iters=ITERS)
    predicted, weight_term, act_term = approx_losses(fresh.candidates, st, None)
    _close(predicted, exact.losses, rtol=1e-4)
    assert act_term == [0.0] * len(alphas)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_activation_step_is_exact_for_tensor_and_row(granularity):
    """The per-step range of X/s (hence Delta) comes out exactly from the per-channel min/max."""
    _, _, xs = search_problem(out=64, tokens=6, shift=0.2)
    acfg = ActQuantConfig(bits=8, granularity=granularity)
    st = _stats(xs, granularity)
    s = torch.rand(2, 64) + 0.5
    got = noise_variance(st, s, acfg)[0]
    for k in range(2):
        want = 0.0
        for x in xs:
            xs_ = x / s[k]
            dims = (0, 1, 2) if granularity == "tensor" else (1, 2)
            delta = (xs_.amax(dims) - xs_.amin(dims)) / 255
            want += float(delta.double().pow(2).mean()) / 12
        assert float(got[k]) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("scheme,granularity", [("ditas", "tensor"), ("ditas", "row"), ("ditas", "token"),
                                                ("reference", "tensor")])
def test_prediction_tracks_the_exact_loss_with_activation_quantization(scheme, granularity):
    w, b, xs = search_problem(steps=2, out=64, batch=4, tokens=16, shift=0.2)
    alphas = alpha_grid(0.1)
    wcfg = WeightQuantConfig(bits=4, group_size=32 if scheme == "ditas" else None, scheme=scheme)
    acfg = ActQuantConfig(bits=6, granularity=granularity, scheme=scheme)
    st = _stats(xs, granularity, token_samples=64)
    exact = _exact(w, b, xs, st.absmax, alphas, wcfg, acfg)
    search = AlphaSearch.of_layer(w, b, st.absmax, alphas, wcfg, acfg, lora_rank=RANK, lora_iters=ITERS)
    predicted = approx_losses(search.candidates, st, acfg)[0]
    ratio = torch.tensor(predicted) / torch.tensor(exact.losses)
    assert ratio.min() > 0.5 and ratio.max() < 2.0, ratio
    # the predicted choice costs little under the exact loss
    k = min(range(len(alphas)), key=predicted.__getitem__)
    assert exact.losses[k] <= 1.5 * min(exact.losses)


def test_quantize_dit_approx_uses_one_loop():
    from models import DiT_models
    from diffusion.sampling import make_sampler, sample_inputs
    torch.manual_seed(0)
    model = DiT_models["DiT-XS/2"](input_size=8, in_channels=3, num_classes=10).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "pos_embed":
                p.add_(torch.randn_like(p) * 0.05)
    sampler = make_sampler(model, 3, 1.5, clip_denoised=True)
    calls = []

    def loop():
        calls.append(1)
        gens, y, z = sample_inputs(1, range(4), 10, (3, 8, 8), [0, 1, 2, 3])
        sampler(z, y, gens)

    cfg = QuantConfig(weight_bit=4, act_bit=8, group_size=32, lora_rank=4, lora_iters=2, smoothing="search",
                      alpha_step=0.25, search="approx", bias_correction=False)  # its one loop (correction: +1)
    report = quantize_dit(model, cfg, loop, progress=False)
    assert len(calls) == 1 and report["calibration"]["fp_passes"] == 1 and report["calibration"]["search"] == "approx"
    for name in quantizable_layers(model):
        r = report["layers"][name]
        assert isinstance(model.get_submodule(name), QuantLinear)
        assert len(r["search_losses"]) == 5 and r["search_steps"] == 3
        assert r["output_error"] == min(r["search_losses"].values())


def test_quantize_dit_dispatches_on_search():
    with pytest.raises(ValueError):
        QuantConfig(search="fast")
    # the ditas search ranks by the prediction and scores a shortlist; the reference scheme and one alpha: exact
    assert (QuantConfig().search, QuantConfig().search_shortlist) == ("exact", None)  # ditas: one alpha by default
    searched = QuantConfig(smoothing="search")
    assert (searched.search, searched.search_shortlist) == ("shortlist", 2)
    assert (QuantConfig(scheme="reference").search, QuantConfig(scheme="reference").search_shortlist) == ("exact", None)
    assert QuantConfig(alpha=0.5).search == QuantConfig(smoothing="none").search == "exact"


def test_quantdit_search_flag(tmp_path):
    """QuantDiT.py --search approx: one loop, the report says so, the default directory name too."""
    import json
    import os

    import QuantDiT
    from models import DiT_models
    torch.manual_seed(0)
    m = DiT_models["DiT-XS/2"](input_size=8, in_channels=3, num_classes=10)
    ckpt = tmp_path / "xs.pt"
    torch.save(m.state_dict(), ckpt)
    argv = ["--model", "DiT-XS/2", "--ckpt", str(ckpt), "--image-size", "8", "--num-classes", "10", "--vae", "none",
            "--num-sampling-steps", "2", "--calib-labels", "0", "1", "--group-size", "32", "--lora-rank", "2",
            "--lora-iters", "1", "--smoothing", "search", "--alpha-step", "0.5", "--no-preview", "--results-dir",
            str(tmp_path), "--no-bias-correction", "--search", "approx"]
    out = QuantDiT.main(QuantDiT.build_parser().parse_args(argv))
    assert os.path.basename(out).endswith("-search-r2-nobiascorr-approxsearch")
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["calibration"]["search"] == "approx" and report["calibration"]["fp_passes"] == 1
    with open(os.path.join(out, "quant_config.json")) as f:
        assert json.load(f)["search"] == "approx"
    assert QuantDiT.quant_config_from_args(QuantDiT.build_parser().parse_args(argv[:-2])).search == "shortlist"


def test_reference_per_token_models_the_clamped_maximum():
    """The reference scheme clamps each range's maximum by about a step: per token (small ranges) the
    prediction accounts for it (in the channel holding the maximum) and lands within 10 %."""
    w, b, xs = search_problem(steps=2, out=64, batch=4, tokens=16, shift=0.2)
    alphas = [0.0, 0.5, 1.0]
    wcfg = WeightQuantConfig(bits=8, scheme="reference")
    acfg = ActQuantConfig(bits=8, granularity="token", scheme="reference")
    st = _stats(xs, "token", token_samples=64)
    exact = _exact(w, b, xs, st.absmax, alphas, wcfg, acfg)
    fresh = AlphaSearch.of_layer(w, b, st.absmax, alphas, wcfg, acfg, lora_rank=RANK, lora_iters=ITERS)
    _, wt, nt = approx_losses(fresh.candidates, st, acfg)
    ratio = (torch.tensor(wt) + torch.tensor(nt)) / torch.tensor(exact.losses)
    assert (ratio - 1).abs().max() < 0.1, ratio
    # without the clamped-maximum term the activation error is underestimated
    uniform, _ = noise_variance(st, fresh.candidates.smooth, acfg)
    ws2 = (fresh.candidates.effective().unsqueeze(0) * fresh.candidates.smooth[:, None, :]).double().pow(2).sum(dim=(1, 2))
    plain = torch.tensor(wt) + uniform * ws2 / w.shape[0]
    assert (plain / torch.tensor(exact.losses)).min() < 0.8  # 0.67 at alpha 0.5 here


def test_shortlist_search_scores_the_best_predicted_exactly():
    """--search shortlist: every alpha predicted (the approximate search's losses on the same statistics),
    the K best scored exactly; K = every alpha is the exact search bit for bit (same alphas, same losses),
    K = 1 takes the predicted winner; two FP loops either way, every layer reported."""
    from helpers import calib_loop, random_dit
    base = dict(group_size=32, lora_rank=4, lora_iters=2, smoothing="search", alpha_step=0.25)
    reports = {}
    for key, cfg in (("exact", QuantConfig(**base, search="exact")), ("all", QuantConfig(**base, search_shortlist=5)),
                     ("one", QuantConfig(**base, search_shortlist=1)), ("two", QuantConfig(**base)),
                     ("approx", QuantConfig(**base, search="approx"))):
        model = random_dit()
        reports[key] = quantize_dit(model, cfg, calib_loop(model, 2, 2), progress=False)
    for name, ex in reports["exact"]["layers"].items():
        every, one, two = (reports[k]["layers"][name] for k in ("all", "one", "two"))
        assert every["search_losses"] == ex["search_losses"] and every["alpha"] == ex["alpha"]
        predicted = reports["approx"]["layers"][name]["search_losses"]  # the same statistics and candidates
        for r in (every, one, two):
            _close(list(r["search_losses_predicted"].values()), list(predicted.values()), rtol=1e-4)
            assert list(r["search_losses_predicted"]) == list(predicted)
        ranked = sorted(predicted, key=predicted.get)
        assert list(one["search_losses"]) == ranked[:1] and str(one["alpha"]) == ranked[0]
        assert sorted(two["search_losses"]) == sorted(ranked[:2])
        assert two["output_error"] == min(two["search_losses"].values())
        for a, v in two["search_losses"].items():  # the shortlisted candidates' exact scores
            assert v == pytest.approx(ex["search_losses"][a], rel=1e-6)
    for key in ("all", "one", "two"):
        # statistics and scoring, and the bias correction's loop (the ditas default)
        assert reports[key]["calibration"]["fp_passes"] == 3 and reports[key]["calibration"]["search"] == "shortlist"


def test_step_stack_is_the_sequence_appended():
    """StepStack (InputStats' per-step storage): reads back exactly what was appended, in order, across
    its blocks; a tensor of another shape starts a new block; its bytes are its blocks'."""
    from quant.search.approx import STEP_BLOCK, StepStack
    st, ref = StepStack(), []
    for t in range(STEP_BLOCK + 3):  # a full block and part of a second
        x = torch.full((2, 3), float(t))
        st.append(x)
        ref.append(x.clone())
    st.append(torch.ones(5))
    ref.append(torch.ones(5))
    st.append(torch.full((2, 3), -1.0))
    ref.append(torch.full((2, 3), -1.0))
    assert len(st) == STEP_BLOCK + 5 and all(torch.equal(a, b) for a, b in zip(st, ref)) and torch.equal(st[7], ref[7])
    assert [tuple(b.shape) for b in st.blocks()] == [(STEP_BLOCK, 2, 3), (3, 2, 3), (1, 5), (1, 2, 3)]
    assert torch.equal(torch.cat(st.blocks()[:2]), torch.stack(ref[:STEP_BLOCK + 3]))
    assert st.nbytes() == 4 * STEP_BLOCK * (6 + 6 + 5 + 6) and not st.blocks()[0].is_cuda
    import pickle  # to another process (quant/calibration/wire.py): the filled steps only, and it grows on from there
    again = pickle.loads(pickle.dumps(st))
    assert all(torch.equal(a, b) for a, b in zip(again, ref)) and again.nbytes() == 4 * ((STEP_BLOCK + 3) * 6 + 5 + 6)
    again.append(torch.full((2, 3), 7.0))
    assert len(again) == len(st) + 1 and torch.equal(again[-1], torch.full((2, 3), 7.0))
