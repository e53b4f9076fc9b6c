"""The calibration's memory budget (quant/calibration/budget.py): state formulas, grouped passes, too-small budgets."""
import os

import pytest
import torch

import QuantDiT
from helpers import assert_one_line_error, calib_loop, call_main, random_dit
from quant.search.approx import STEP_BLOCK, InputStats
from quant.calibration.budget import (GIB, by_memory, device_bytes, layer_state_bytes, layer_state_parts, plan_groups,
                          range_bytes, statistic_bytes, transient_bytes)
from quant.calibration.driver import quantize_dit
from quant.quant_config import QuantConfig
from quant.calibration.feed import ChunkedLoop, LoopShape
from quant.method.layers import quantizable_layers
from quant.search.candidates import Candidates
from quant.quant_config import WeightQuantConfig

BASE = dict(group_size=32, lora_rank=4, lora_iters=2)
SMALL = dict(BASE, smoothing="search", alpha_step=0.25)
CONFIGS = [
    QuantConfig(**SMALL),                                            # ditas W4: packed codes, the shortlist
    QuantConfig(**SMALL, search="exact"),                            # every candidate through the scoring
    QuantConfig(**SMALL, weight_bit=8, act_granularity="token"),      # ditas W8: one byte a code
    QuantConfig(**{**BASE, "group_size": None}, smoothing="none"),  # one candidate, per channel
    QuantConfig(**{**SMALL, "group_size": None}, scheme="reference"),  # shared-weight operands
    QuantConfig(**{**SMALL, "group_size": None}, scheme="reference", search_dtype="bf16"),
    QuantConfig(**SMALL, search="approx"),                           # X^T X statistics
    QuantConfig(**BASE, alpha=0.5),                                  # fixed alpha: one candidate
    QuantConfig(**SMALL, act_granularity="tensor"),                  # one range per step
    QuantConfig(**SMALL, search="approx", act_granularity="token", search_steps=1),  # token samples, capped
]
XS_LOOP = LoopShape(steps=2, rows=4, tokens=16)  # calib_loop(random_dit(), 2, 2): 2 labels x 2 (guidance), 4x4 tokens


def _shaped(loop, shape):
    return ChunkedLoop(lambda chunks: loop(), 1, shape)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.scheme}-W{c.weight_bit}-{c.smoothing}-{c.search}-"
                                                       f"{c.search_dtype}")
def test_state_formula_equals_the_bytes_held(cfg):
    """Every layer's reported state (what its search held between steps) equals the planned estimate."""
    model = random_dit()
    shapes = {n: tuple(lin.weight.shape) for n, lin in quantizable_layers(model).items()}
    report = quantize_dit(model, cfg, _shaped(calib_loop(model, 2, 2), XS_LOOP), progress=False)
    for name, (out, inp) in shapes.items():
        assert report["layers"][name]["state_bytes"] == layer_state_bytes(out, inp, cfg, loop=XS_LOOP), name
        has_ranges = cfg.search != "exact"  # the shortlist's and approx's per-step ranges, STEP_BLOCK steps a block
        assert (layer_state_parts(out, inp, cfg, loop=XS_LOOP)["ranges"] > 0) == has_ranges
    cal = report["calibration"]
    assert cal["state_bytes_total"] == cal["state_bytes_estimated"] == cal["state_bytes_max"]
    assert cal["groups"] == 1 and cal["ranks"] == 1 and cal["peak_rss_bytes"] > 0
    assert cal["fp_passes"] == (1 if cfg.search == "approx" or cfg.smoothing == "none" else 2) + cfg.bias_correction


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
    pass1 += cfg.bias_correction  # and the bias correction's loop, once
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


@pytest.mark.parametrize("granularity,rows,tokens", [("tensor", 3, 5), ("row", 3, 5), ("token", 3, 5),
                                                     ("token", 8, 16)])
@pytest.mark.parametrize("steps,cap", [(1, None), (STEP_BLOCK + 1, None), (STEP_BLOCK + 1, 3)])
def test_range_bytes_are_the_ranges_held(granularity, rows, tokens, steps, cap):
    """InputStats' per-step ranges over `steps` updates of (rows, tokens, C) inputs hold range_bytes, whole
    blocks of STEP_BLOCK steps (token: min(64, rows x tokens) sampled per step); the search step cap bounds them."""
    cfg = QuantConfig(**SMALL, act_granularity=granularity, search_steps=cap)
    st = InputStats(granularity, max_steps=cap, dtype=torch.float32)
    for t in range(steps):
        st.update(torch.randn(rows, tokens, 64))
    want = range_bytes(64, cfg, LoopShape(steps, rows, tokens))
    assert st.range_nbytes() == want > 0
    kept = steps if cap is None else min(cap, steps)
    per_step = {"tensor": 2, "row": 2 * rows, "token": min(64, rows * tokens)}[granularity]
    assert want == 4 * 64 * per_step * STEP_BLOCK * -(-kept // STEP_BLOCK)
    held = st.nbytes()
    st.release()  # the shortlist, once ranked: the ranges are freed, the bytes held are still reported
    assert st.range_nbytes() == want and st.nbytes() == held and len(st.cmin) == len(st.tokens) == 0
    assert range_bytes(64, QuantConfig(**SMALL, act_granularity=granularity, search="exact"),
                       LoopShape(steps, rows, tokens)) == 0 and range_bytes(64, cfg, None) == 0


def test_ranges_are_host_memory_on_cuda():
    """On CUDA the per-step ranges are host bytes, outside the device budget; on the CPU everything is the device's."""
    cfg, loop = QuantConfig(**SMALL), LoopShape(steps=40, rows=32, tokens=256)
    parts = layer_state_parts(128, 64, cfg, "cuda", loop=loop)
    assert parts["ranges"] == 4 * 64 * 2 * 32 * 48  # 40 steps in 3 blocks of 16
    assert by_memory(parts, "cuda") == {"device": sum(parts.values()) - parts["ranges"], "host": parts["ranges"]}
    assert by_memory(parts, "cpu") == {"device": sum(parts.values()), "host": 0}
    assert device_bytes(128, 64, cfg, "cuda", loop=loop) == device_bytes(128, 64, cfg, "cuda")
    assert device_bytes(128, 64, cfg, "cpu", loop=loop) == device_bytes(128, 64, cfg, "cpu") + parts["ranges"]
    shapes = {f"l{i}": (128, 64) for i in range(6)}
    # a budget of 2 layers' device state: the ranges split the layers into more groups on the CPU only
    budget = 2 * device_bytes(128, 64, cfg, "cuda") + transient_bytes(128, 64, cfg)
    cuda, sizes = plan_groups(shapes, cfg, budget, "cuda", loop=loop)
    assert len(cuda) == 3 and sizes["l0"] == layer_state_bytes(128, 64, cfg, "cuda", loop=loop)
    assert len(plan_groups(shapes, cfg, budget, "cuda")[0]) == 3  # the loop's ranges do not count there
    cpu_budget = 2 * device_bytes(128, 64, cfg, "cpu", loop=loop) + transient_bytes(128, 64, cfg)
    assert len(plan_groups(shapes, cfg, cpu_budget, "cpu", loop=loop)[0]) == 3
    assert len(plan_groups(shapes, cfg, cpu_budget, "cpu")[0]) < 3  # they do on the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ranges_of_cuda_inputs_do_not_grow_the_device_memory():
    """InputStats fed CUDA inputs keeps its per-step ranges in pinned host blocks, read back exactly."""
    dev = torch.device("cuda")
    xs = [torch.randn(4, 8, 64, device=dev) for _ in range(STEP_BLOCK + 2)]
    st = InputStats("row", dtype=torch.float32)
    st.update(xs[0])
    before = torch.cuda.memory_allocated(dev)
    for x in xs[1:]:
        st.update(x)
    assert torch.cuda.memory_allocated(dev) == before  # X^T X accumulated in place, the ranges on the host
    assert all(b.is_pinned() for b in st.cmin.blocks()) and st.range_nbytes() == 2 * 4 * 64 * 4 * 2 * STEP_BLOCK
    assert torch.equal(torch.cat(st.cmax.blocks(dev)), torch.stack([x.amax(1) for x in xs]))
    assert torch.equal(torch.stack(list(st.cmin)), torch.stack([x.amin(1) for x in xs]).cpu())
