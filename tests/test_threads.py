"""Threads as torch users expect (OMP_NUM_THREADS respected, the wait policy chosen from the load at start) and
checkpoints that do not depend on the thread count."""
import os
import subprocess
import sys

import pytest
import torch

import QuantDiT
from ditas import threads
from bundled.digits import BUNDLED_FLAGS
from helpers import ROOT, call_main, run_script, search_problem
from quant.method import lapack
from quant.quant_config import QuantConfig
from quant.search.candidates import Candidates


@pytest.fixture
def no_launcher_env(monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_threads_follow_omp_num_threads_then_torchrun_then_the_affinity_mask(no_launcher_env,
                                                                                      restore_threads):
    env = no_launcher_env
    assert threads.env_threads() is None
    assert threads.default_threads() == threads.planned_threads() == len(os.sched_getaffinity(0))
    env.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.default_threads() == threads.planned_threads() == 1
    env.setenv("OMP_NUM_THREADS", "3")  # torch's reading of it, when set, wins over the torchrun default
    torch.set_num_threads(3)
    assert threads.env_threads() == threads.planned_threads() == 3
    assert threads.default_threads() == 3
    env.setenv("MKL_NUM_THREADS", "5")  # torch lets MKL_NUM_THREADS override OMP_NUM_THREADS
    assert threads.env_threads() == 5
    for bad in ("", "0", "x"):
        env.setenv("MKL_NUM_THREADS", bad)
        assert threads.env_threads() == 3, bad
    assert threads.env_threads({"OMP_NUM_THREADS": "4,2"}) == 4  # nested form: the outer level


def test_set_threads_takes_n_or_the_default_and_refuses_non_positive(no_launcher_env, restore_threads):
    from quant.errors import UserError
    assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1
    no_launcher_env.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert threads.set_threads() == 1
    for bad in (0, -2, True, 1.5):
        with pytest.raises(UserError, match="--threads must be a positive integer"):
            threads.set_threads(bad)


@pytest.mark.parametrize("env,busy,cores,n,policy", [
    ({"OMP_WAIT_POLICY": "ACTIVE"}, 2.0, 2, 2, None),  # the user's setting stays
    ({}, None, 2, 2, "PASSIVE"),                        # load unknown: sleep (the safe side)
    ({}, 0.1, 2, 2, None),                              # quiet: libgomp's spin-then-sleep
    ({}, 0.7, 2, 2, "PASSIVE"),                         # a competitor on one of our two cores
    ({}, 1.0, 2, 1, None),                              # one thread, one idle core: no contention
    ({}, 1.0, 16, 16, "PASSIVE"),
    ({}, 2.0, 16, 8, None),
])
def test_wait_policy_is_passive_only_when_the_idle_cores_are_fewer_than_the_threads(env, busy, cores, n, policy):
    assert threads.choose_wait_policy(env, busy, cores, n) == policy


def _policy_at_start(env):
    code = "import os; from ditas import threads; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**full, **env}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="the load is read from /proc/stat")
def test_a_busy_core_at_start_makes_waiting_threads_sleep_and_an_explicit_policy_stays():
    assert 0.0 <= threads.busy_cores() <= len(os.sched_getaffinity(0)) + 1e-9
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(hog.pid, os.sched_getaffinity(0))  # on one of our cores
        import time
        time.sleep(0.3)  # spinning
        assert _policy_at_start({}) == "PASSIVE"
        assert _policy_at_start({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
    finally:
        hog.kill()
        hog.wait()


@pytest.mark.parametrize("shape", [(384, 48), (48, 384), (200, 200)])
def test_lapack_factorisations_give_the_same_bits_at_any_thread_count(shape, restore_threads):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(*shape, generator=g)
    sym = (a.T @ a).double()[:48, :48]
    outs = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        outs.append((lapack.qr(a).Q, *lapack.svd(a, full_matrices=False), *lapack.eigh(sym)))
        assert torch.get_num_threads() == n  # restored after each call
    for other in outs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(outs[0], other))


@pytest.mark.parametrize("svd", ["subspace", "full"])
def test_candidates_do_not_depend_on_the_thread_count(svd, restore_threads):
    """Every alpha's smoothing, quantization and warm-started LoRA fit: bit-equal at 1 and 2 threads (not promised at
    every count: MKL splits some small products differently at 3 threads, see quant/method/lapack.py)."""
    w, b, xs = search_problem(out=192, inp=128)
    absmax = torch.stack([x.abs().amax(dim=(0, 1)) for x in xs]).amax(0)
    cfg = QuantConfig(group_size=32, lora_rank=8, lora_iters=4)
    made = []
    for n in (1, 2):
        torch.set_num_threads(n)
        c = Candidates(w, b, absmax, cfg.alphas(), cfg.weight_cfg(), cfg.lora_rank, cfg.lora_iters, svd=svd)
        made.append((c.codes, c.scale, c.zero, c.L, c.R, c.errors))
    for other in made[1:]:
        assert all(torch.equal(x, y) for x, y in zip(made[0], other))


QUICK = [*BUNDLED_FLAGS, "--num-sampling-steps", "4", "--calib-labels", "0", "3", "7", "9", "--no-preview"]


def _checkpoint(out):
    with open(os.path.join(out, "model.safetensors"), "rb") as f:
        return f.read()


@pytest.mark.parametrize("scheme", ["ditas", "reference"])
def test_quantdit_writes_the_same_checkpoint_at_1_and_2_threads(tmp_path, scheme, restore_threads):
    """The bundled model, every layer and alpha of the scheme's default search: the same bytes at 1 and 2 threads."""
    for n in (1, 2):
        code, err = call_main(QuantDiT, *QUICK, "--scheme", scheme, "--threads", n, "--out", tmp_path / str(n))
        assert code in (0, None), err
    assert _checkpoint(tmp_path / "1") == _checkpoint(tmp_path / "2")


def test_omp_num_threads_gives_the_checkpoint_of_the_same_threads_flag(tmp_path):
    flags = [*QUICK, "--lora-iters", "2"]
    env = {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "", "WORLD_SIZE": ""}
    by_env = run_script("QuantDiT.py", *flags, "--out", tmp_path / "env", env=env)
    assert by_env.returncode == 0, by_env.stderr[-2000:]
    assert "1 threads" in by_env.stdout
    by_flag = run_script("QuantDiT.py", *flags, "--threads", "1", "--out", tmp_path / "flag",
                         env={"OMP_NUM_THREADS": "2"})
    assert by_flag.returncode == 0, by_flag.stderr[-2000:]
    assert _checkpoint(tmp_path / "env") == _checkpoint(tmp_path / "flag")


def test_predicted_losses_do_not_depend_on_the_thread_count(restore_threads):
    """The shortlist's ranking (approx_search.approx_losses) at 1 and 2 threads: equal floats."""
    from quant.search.approx import InputStats, approx_losses
    w, b, xs = search_problem(out=384, inp=256, batch=8, tokens=16)
    cfg = QuantConfig(group_size=32, lora_rank=4, lora_iters=2)
    stats = InputStats(cfg.act_cfg().granularity)
    for x in xs:
        stats.update(x)
    c = Candidates(w, b, stats.value, cfg.alphas(), cfg.weight_cfg(), cfg.lora_rank, cfg.lora_iters, svd=cfg.svd)
    losses = []
    for n in (1, 2):
        torch.set_num_threads(n)
        losses.append(approx_losses(c, stats, cfg.act_cfg()))
    assert losses[0] == losses[1]
