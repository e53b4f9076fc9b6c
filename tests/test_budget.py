"""The calibration's memory budget (quant/budget.py): state formulas, grouped passes, too-small budgets."""
import os

import pytest
import torch

import QuantDiT
from helpers import assert_one_line_error, calib_loop, call_main, random_dit
from quant.budget import GIB, layer_state_bytes, plan_groups, statistic_bytes, transient_bytes
from quant.calibrate import quantize_dit
from quant.config import QuantConfig
from quant.layers import quantizable_layers
from quant.search import Candidates
from quant.quantizer import WeightQuantConfig

SMALL = dict(group_size=32, lora_rank=4, lora_iters=2, alpha_step=0.25)
CONFIGS = [
    QuantConfig(**SMALL),                                            # ditas W4: packed codes, the shortlist
    QuantConfig(**SMALL, search="exact"),                            # every candidate through the scoring
    QuantConfig(**SMALL, weight_bit=8, act_granularity="token"),      # ditas W8: one byte a code
    QuantConfig(**{**SMALL, "group_size": None}, smoothing="none"),  # one candidate, per channel
    QuantConfig(**{**SMALL, "group_size": None}, scheme="reference"),  # shared-weight operands
    QuantConfig(**{**SMALL, "group_size": None}, scheme="reference", search_dtype="bf16"),
    QuantConfig(**SMALL, search="approx"),                           # X^T X statistics
    QuantConfig(**SMALL, alpha=0.5),                                 # fixed alpha: one candidate
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.scheme}-W{c.weight_bit}-{c.smoothing}-{c.search}-"
                                                       f"{c.search_dtype}")
def test_state_formula_equals_the_bytes_held(cfg):
    """Every layer's reported state (what its search held between steps) equals the planned estimate."""
    model = random_dit()
    shapes = {n: tuple(lin.weight.shape) for n, lin in quantizable_layers(model).items()}
    report = quantize_dit(model, cfg, calib_loop(model, 2, 2), progress=False)
    for name, (out, inp) in shapes.items():
        assert report["layers"][name]["state_bytes"] == layer_state_bytes(out, inp, cfg), name
    cal = report["calibration"]
    assert cal["state_bytes_total"] == cal["state_bytes_estimated"] == cal["state_bytes_max"]
    assert cal["groups"] == 1 and cal["ranks"] == 1 and cal["peak_rss_bytes"] > 0
    assert cal["fp_passes"] == (1 if cfg.search == "approx" or cfg.smoothing == "none" else 2)


def test_candidates_hold_codes_not_dense_weights():
    """21 ditas W4 candidates of a 96x64 layer: half a byte a weight plus scales and LoRA, no float copy."""
    torch.manual_seed(0)
    w, a = torch.randn(96, 64), torch.rand(64) + 0.1
    alphas = [k / 20 for k in range(21)]
    c = Candidates(w, None, a, alphas, WeightQuantConfig(4, 32), lora_rank=4, lora_iters=2, svd="subspace")
    # per candidate: 4-bit codes two a byte, fp32 scale and zero per group of 32, LoRA factors, smoothing
    assert c.nbytes() == 21 * (96 * 32 + 2 * 4 * 96 * 2 + 4 * 4 * (96 + 64) + 4 * 64)
    assert c.codes.dtype == torch.uint8 and c.codes.shape == (21, 96, 32)  # an eighth of a dense fp32 stack
    k = 7  # decoding a candidate gives the fit's own weight
    q = c.qweight(k)
    assert q.codes.shape == (96, 64) and int(q.codes.max()) <= 15
    ref = Candidates(w, None, a, [alphas[k]], WeightQuantConfig(4, 32), lora_rank=4, lora_iters=2, svd="full")
    assert c.layer(k).alpha == ref.layer(0).alpha and torch.equal(c.smooth[k], ref.smooth[0])


def test_groups_are_consecutive_and_fit():
    shapes = {f"l{i}": (64 * (1 + i % 3), 64) for i in range(9)}
    cfg = QuantConfig(**SMALL)
    sizes = {n: layer_state_bytes(o, i, cfg) for n, (o, i) in shapes.items()}
    budget = 2 * max(sizes.values())
    groups, _ = plan_groups(shapes, cfg, budget)
    assert [n for g in groups for n in g] == list(shapes) and len(groups) > 1
    # the shortlist: one layer's candidates beyond the kept ones are held too, while it is ranked
    transient = max(transient_bytes(o, i, cfg) for o, i in shapes.values())
    assert transient > 0 and all(sum(sizes[n] for n in g) + transient <= budget for g in groups)
    assert plan_groups(shapes, cfg, None)[0] == [list(shapes)]


def test_processes_dividing_the_chunks_plan_for_their_part_of_the_budget():
    """Each of the W ranks dividing the FP loops' chunks holds every rank's groups of a round."""
    shapes = {f"l{i}": (64 * (1 + i % 3), 64) for i in range(9)}
    cfg = QuantConfig(**SMALL)
    budget = 4 * max(layer_state_bytes(o, i, cfg) + transient_bytes(o, i, cfg) for o, i in shapes.values())
    assert plan_groups(shapes, cfg, budget, holders=2) == plan_groups(shapes, cfg, budget / 2)
    slots = plan_groups(shapes, cfg, None, statistic_slots=3)[1]
    one = plan_groups(shapes, cfg, None)[1]
    assert all(slots[n] - one[n] == 2 * statistic_bytes(o, i, cfg) for n, (o, i) in shapes.items())
    largest = max(layer_state_bytes(o, i, cfg) + transient_bytes(o, i, cfg) for o, i in shapes.values())
    with pytest.raises(ValueError, match="on each of the 2 processes dividing the FP loops' chunks") as e:
        plan_groups(shapes, cfg, 1.5 * largest, holders=2)
    need = float(str(e.value).rsplit(" ", 1)[1]) * GIB
    assert 2 * largest <= need < 2 * largest + 0.01 * GIB


@pytest.mark.parametrize("search", ["exact", "approx", "shortlist"])
def test_grouped_passes_give_the_same_model(search):
    """A budget of one layer's state: a group per layer, each over its own FP loop; identical layers."""
    cfg = QuantConfig(**SMALL, search=search)
    states, reports = [], []
    for budget in (None, "one layer"):
        model = random_dit()
        shapes = {n: tuple(lin.weight.shape) for n, lin in quantizable_layers(model).items()}
        size = None if budget is None else max(layer_state_bytes(o, i, cfg) + transient_bytes(o, i, cfg)
                                               for o, i in shapes.values())
        reports.append(quantize_dit(model, cfg, calib_loop(model, 2, 2), progress=False, memory_budget=size))
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    one, grouped = reports[0]["calibration"], reports[1]["calibration"]
    # exact: one TAS pass, then a scoring pass per group; approx: a statistics pass per group; shortlist: both
    pass1, per_group = {"exact": (1, 1), "approx": (0, 1), "shortlist": (0, 2)}[search]
    assert one["groups"] == 1 and one["fp_passes"] == pass1 + per_group
    assert grouped["groups"] == len(plan_groups(shapes, cfg, size)[0])  # as planned (the largest layer sets the size)
    assert grouped["groups"] > 1 and grouped["fp_passes"] == pass1 + per_group * grouped["groups"]
    assert grouped["state_bytes_max"] < one["state_bytes_max"]
    for name in shapes:
        assert reports[0]["layers"][name]["search_losses"] == reports[1]["layers"][name]["search_losses"]


def test_budget_below_one_layer_names_it():
    model = random_dit()
    cfg = QuantConfig(**SMALL)
    with pytest.raises(ValueError, match=r"too small for blocks\.0\.mlp\.fc2.*at least --calib-memory-gb"):
        quantize_dit(model, cfg, calib_loop(model, 2, 2), progress=False, memory_budget=1000)


def test_quantdit_budget_errors(tmp_path):
    ckpt = tmp_path / "xs.pt"
    torch.save(random_dit().state_dict(), ckpt)
    base = ["--model", "DiT-XS/2", "--image-size", "8", "--num-classes", "10", "--vae", "none", "--ckpt", ckpt,
            "--num-sampling-steps", "2", "--group-size", "32", "--lora-rank", "4", "--no-preview", "--out",
            tmp_path / "q"]
    code, err = call_main(QuantDiT, *base, "--calib-memory-gb", "0.000001")
    assert_one_line_error(code, err, "--calib-memory-gb 1e-06 is too small for blocks.0.mlp.fc2",
                          "pass at least --calib-memory-gb 0.01")
    code, err = call_main(QuantDiT, *base, "--calib-memory-gb", "0")
    assert_one_line_error(code, err, "--calib-memory-gb must be positive")
    assert not os.path.exists(tmp_path / "q")
    assert GIB == 2 ** 30
