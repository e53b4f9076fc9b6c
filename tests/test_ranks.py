"""Calibration over several processes (quant/ranks.py, QuantDiT.py under torchrun with gloo)."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, assert_user_error, random_dit, run_script
from quant.budget import layer_state_bytes, transient_bytes
from quant.config import QuantConfig
from quant.layers import quantizable_layers
from quant.ranks import RankFailed, Ranks

FLAGS = ["--model", "DiT-XS/2", "--image-size", "8", "--num-classes", "10", "--vae", "none",
         "--num-sampling-steps", "3", "--group-size", "32", "--lora-rank", "4", "--lora-iters", "2",
         "--alpha-step", "0.25", "--no-preview", "--threads", "1"]


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


def _launch(tmp_path, *args, nproc=2):
    return run_script("launch.py", "--standalone", f"--nproc_per_node={nproc}", "QuantDiT.py", *args,
                      env={"OMP_NUM_THREADS": "1"})


def test_two_processes_write_the_single_process_checkpoint(ckpt, tmp_path):
    one = run_script("QuantDiT.py", *FLAGS, "--ckpt", ckpt, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    # the parallel run also in groups: a budget of the largest layer's search state (with its transient candidates)
    cfg = QuantConfig(group_size=32, lora_rank=4, lora_iters=2, alpha_step=0.25)
    shapes = [tuple(lin.weight.shape) for lin in quantizable_layers(random_dit()).values()]
    budget = max(layer_state_bytes(o, i, cfg) + transient_bytes(o, i, cfg) for o, i in shapes) / 2 ** 30
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


def test_two_processes_dividing_the_chunks_write_the_single_process_checkpoint(ckpt, tmp_path):
    """--calib-chunks 2: each rank runs one chunk of the FP loops and observes every layer; the per-chunk
    statistics and sums travel to the owners. In groups (a budget of about two layers): the ranks' group
    counts differ, so a rank takes part in rounds with no layers of its own."""
    flags = [*FLAGS, "--ckpt", ckpt, "--calib-chunks", "2"]
    one = run_script("QuantDiT.py", *flags, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    cfg = QuantConfig(group_size=32, lora_rank=4, lora_iters=2, alpha_step=0.25)
    shapes = [tuple(lin.weight.shape) for lin in quantizable_layers(random_dit()).values()]
    # each rank holds both ranks' groups of a round: it plans for half the budget
    budget = 2 * max(layer_state_bytes(o, i, cfg) + transient_bytes(o, i, cfg) for o, i in shapes) * 1.6 / 2 ** 30
    two = _launch(tmp_path, *flags, "--out", tmp_path / "two", "--calib-memory-gb", f"{budget:.9f}")
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("model.safetensors", "quant_config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    import json
    assert "FP loops in 2 chunks, divided among the processes" in two.stdout + two.stderr
    cal = json.loads((tmp_path / "two" / "report.json").read_text())["calibration"]
    assert cal["fp_by_chunks"] and cal["fp_chunks"] == 2
    groups = [m["groups"] for m in cal["per_rank"]]
    assert all(m["fp_passes"] == 2 * max(groups) for m in cal["per_rank"]), cal["per_rank"]  # every round, both
    assert len(set(groups)) > 1, groups
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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_started_with_different_settings(ckpt, tmp_path):
    port = str(_free_port())
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


def _together_worker(rank, port, queue):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ranks = Ranks.current()

    def work():
        if rank == 1:
            raise ValueError("rank one's input is bad")
        return "fine"
    try:
        ranks.together(work)
        queue.put((rank, "returned"))
    except RankFailed as e:
        queue.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


def _check_in_worker(rank, port, queue):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ranks = Ranks.current()

    def work():  # rank 1 fails before the shared loop; rank 0 arrives at the loop's meeting point
        if rank == 1:
            raise ValueError("rank one's candidates failed")
        ranks.check_in()
        return "fine"
    try:
        ranks.together(work)
        queue.put((rank, "returned"))
    except RankFailed as e:
        queue.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


def _run_workers(target):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=target, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    return got


def test_a_rank_failing_before_a_shared_loop_stops_every_rank_there():
    assert _run_workers(_check_in_worker) == {r: "calibration rank 1 of 2 failed: rank one's candidates failed"
                                              for r in range(2)}


def test_one_rank_failing_stops_every_rank_with_its_error():
    assert _run_workers(_together_worker) == {r: "calibration rank 1 of 2 failed: rank one's input is bad"
                                              for r in range(2)}
