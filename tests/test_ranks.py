"""Calibration over several processes (quant/calibration/ranks.py, QuantDiT.py under torchrun with gloo)."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, assert_user_error, free_port, random_dit, run_gloo_workers, run_script
from quant.calibration.budget import layer_cost, layer_state_bytes, plan_groups, transient_bytes
from quant.quant_config import QuantConfig
from quant.calibration.feed import LoopShape
from quant.method.layers import quantizable_layers
from quant.calibration.ranks import RankFailed, Ranks

FLAGS = ["--model", "DiT-XS/2", "--image-size", "8", "--num-classes", "10", "--vae", "none",
         "--num-sampling-steps", "3", "--group-size", "32", "--lora-rank", "4", "--lora-iters", "2",
         "--smoothing", "search", "--alpha-step", "0.25", "--no-preview", "--threads", "1"]
# what a chunk of FLAGS' FP loop feeds a layer per step (the budget's per-step ranges): 16 labels x 2 (guidance), 4x4
LOOP, HALF_LOOP = LoopShape(steps=3, rows=32, tokens=16), LoopShape(steps=3, rows=16, tokens=16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ranks") / "xs.pt"
    torch.save(random_dit().state_dict(), path)
    return str(path)


def test_share_balances_and_covers_every_layer():
    costs = {f"blocks.{b}.{n}": c for b in range(3) for n, c in (("qkv", 3), ("proj", 1), ("fc1", 4), ("fc2", 4))}
    shares = [Ranks(r, 2).share(costs) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(costs) and not set(shares[0]) & set(shares[1])
    loads = [sum(costs[n] for n in s) for s in shares]
    assert abs(loads[0] - loads[1]) <= 1
    assert all(s == sorted(s, key=list(costs).index) for s in shares)  # calibration order kept
    assert Ranks().share(costs) == list(costs)
    with pytest.raises(ValueError, match="13 calibration processes but only 12 layers"):
        Ranks(0, 13).share(costs)


def test_layers_are_shared_by_their_calibration_work():
    shapes = {n: tuple(lin.weight.shape) for n, lin in quantizable_layers(random_dit()).items()}
    costs = {n: layer_cost(o, i, QuantConfig(smoothing="search")) for n, (o, i) in shapes.items()}
    shares = [Ranks(r, 2).share(costs) for r in range(2)]
    # fc1 and fc2 weigh the same, but fc2's X^T X (shortlist statistics) is 16x fc1's: one fc2 per rank
    assert [sum(n.endswith("mlp.fc2") for n in s) for s in shares] == [1, 1], shares
    exact = QuantConfig(search="exact")
    assert all(layer_cost(o, i, exact) == o * i for o, i in shapes.values())


def _launch(tmp_path, *args, nproc=2):
    return run_script("launch.py", "--standalone", f"--nproc_per_node={nproc}", "QuantDiT.py", *args,
                      env={"OMP_NUM_THREADS": "1"})


def test_two_processes_write_the_single_process_checkpoint(ckpt, tmp_path):
    one = run_script("QuantDiT.py", *FLAGS, "--ckpt", ckpt, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    # the parallel run also in groups: a budget of the largest layer's search state (with its transient candidates)
    cfg = QuantConfig(group_size=32, lora_rank=4, lora_iters=2, smoothing="search", alpha_step=0.25)
    shapes = [tuple(lin.weight.shape) for lin in quantizable_layers(random_dit()).values()]
    budget = max(layer_state_bytes(o, i, cfg, loop=LOOP) + transient_bytes(o, i, cfg) for o, i in shapes) / 2 ** 30
    two = _launch(tmp_path, *FLAGS, "--ckpt", ckpt, "--out", tmp_path / "two", "--calib-memory-gb", f"{budget:.9f}")
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("model.safetensors", "quant_config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    said = two.stdout + two.stderr
    assert "4 layers on rank 0 of 2" in said and "rank 1 of 2" not in said  # rank 0's progress only
    import json
    cal = json.loads((tmp_path / "two" / "report.json").read_text())["calibration"]
    assert cal["ranks"] == 2 and [m["rank"] for m in cal["per_rank"]] == [0, 1]
    # the shortlist search: every group its statistics pass and its scoring pass
    assert all(m["fp_passes"] == 2 * m["groups"] for m in cal["per_rank"]), cal["per_rank"]
    assert max(m["groups"] for m in cal["per_rank"]) > 1, cal["per_rank"]


@pytest.mark.parametrize("search", ["shortlist", "exact"])
def test_two_processes_dividing_the_chunks_write_the_single_process_checkpoint(ckpt, tmp_path, search):
    """--calib-chunks 2: each rank runs one chunk of the FP loops and observes every layer; the per-chunk
    statistics and sums travel to the owners. The exact search in groups: its ranks' group counts differ
    (a budget found for that), so a rank takes part in a round with no layers of its own."""
    flags = [*FLAGS, "--ckpt", ckpt, "--calib-chunks", "2", "--search", search]
    one = run_script("QuantDiT.py", *flags, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    cfg = QuantConfig(group_size=32, lora_rank=4, lora_iters=2, smoothing="search", alpha_step=0.25, search=search)
    shapes = {n: tuple(lin.weight.shape) for n, lin in quantizable_layers(random_dit()).items()}
    shares = [Ranks(r, 2).share({n: layer_cost(o, i, cfg) for n, (o, i) in shapes.items()}) for r in range(2)]
    largest = max(layer_state_bytes(o, i, cfg, loop=HALF_LOOP) + transient_bytes(o, i, cfg) for o, i in shapes.values())

    def group_counts(budget):  # each rank holds both ranks' groups of a round: it plans for half the budget
        return [len(plan_groups({n: shapes[n] for n in share}, cfg, budget, holders=2, loop=HALF_LOOP)[0])
                for share in shares]
    budget = None if search == "shortlist" else \
        next(b for b in (2 * largest * (1 + k / 20) for k in range(40)) if len(set(group_counts(b))) > 1)
    memory = [] if budget is None else ["--calib-memory-gb", f"{budget / 2 ** 30:.12f}"]
    two = _launch(tmp_path, *flags, "--out", tmp_path / "two", *memory)
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("model.safetensors", "quant_config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    import json
    assert "FP loops in 2 chunks, divided among the processes" in two.stdout + two.stderr
    cal = json.loads((tmp_path / "two" / "report.json").read_text())["calibration"]
    assert cal["fp_by_chunks"] and cal["fp_chunks"] == 2
    groups = [m["groups"] for m in cal["per_rank"]]
    loops = {"shortlist": 2 * max(groups), "exact": 1 + max(groups)}[search]
    assert all(m["fp_passes"] == loops for m in cal["per_rank"]), cal["per_rank"]  # every round, both ranks
    assert len(set(groups)) == (1 if budget is None else 2), groups
    assert json.loads((tmp_path / "two" / "quant_config.json").read_text())["calib_chunks"] == 2


def test_chunks_must_divide_the_labels_and_need_row_ranges(ckpt, tmp_path):
    import QuantDiT
    from helpers import assert_one_line_error, call_main
    code, err = call_main(QuantDiT, *FLAGS, "--ckpt", ckpt, "--out", tmp_path / "q", "--calib-chunks", "3")
    assert_one_line_error(code, err, "--calib-chunks 3: must divide the 16 calibration labels")
    code, err = call_main(QuantDiT, *FLAGS, "--ckpt", ckpt, "--out", tmp_path / "q", "--calib-chunks", "2",
                          "--scheme", "reference")
    assert_one_line_error(code, err, "needs activation ranges per row or token")
    assert not os.path.exists(tmp_path / "q")


def test_more_processes_than_layers(ckpt, tmp_path):
    proc = _launch(tmp_path, *FLAGS, "--ckpt", ckpt, "--out", tmp_path / "q", nproc=9)
    assert_user_error(proc, "9 calibration processes but only 8 layers to calibrate")
    assert not os.path.exists(tmp_path / "q")


def test_ranks_started_with_different_settings(ckpt, tmp_path):
    port = str(free_port())
    procs = []
    for rank, lora in enumerate(("4", "8")):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", OMP_NUM_THREADS="1")
        argv = [sys.executable, "QuantDiT.py", *FLAGS, "--ckpt", ckpt, "--out", tmp_path / "q", "--lora-rank", lora]
        procs.append(subprocess.Popen(list(map(str, argv)), cwd=ROOT, env=env, stderr=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert outs[1][1].strip() == ""  # the error is named once, by rank 0

    class Proc:
        returncode, stdout, stderr = 2, outs[0][0], outs[0][1]
    assert_user_error(Proc, "rank 1 was started with other flags than rank 0", "lora_rank")
    assert not os.path.exists(tmp_path / "q")


def _failing_worker(rank, port, queue, check_in):
    """Rank 1 fails inside `together`; rank 0 either returns from it or (check_in) first arrives at a shared
    loop's meeting point."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ranks = Ranks.current()

    def work():
        if rank == 1:
            raise ValueError("rank one's input is bad")
        if check_in:
            ranks.check_in()
        return "fine"
    try:
        ranks.together(work)
        queue.put((rank, "returned"))
    except RankFailed as e:
        queue.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("check_in", [False, True], ids=["together", "before-a-shared-loop"])
def test_one_rank_failing_stops_every_rank_with_its_error(check_in):
    error = "calibration rank 1 of 2 failed: rank one's input is bad"
    assert run_gloo_workers(_failing_worker, check_in) == {r: error for r in range(2)}
