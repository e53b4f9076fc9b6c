"""Objects with large tensors between processes (quant/calibration/wire.py): the pickle without them, then raw bytes."""
from dataclasses import dataclass

import torch

from quant.calibration import wire
from quant.search.approx import InputStats
from helpers import run_gloo_workers


@dataclass
class Box:
    name: str
    items: list


def _object():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(96, 200, generator=g)  # 76.8 kB: over INLINE_BYTES
    stats = InputStats("tensor", dtype=torch.float32)
    for _ in range(3):
        stats.update(torch.randn(4, 5, 160, generator=g))  # X^T X: 160 x 160 float32, 102 kB
    obj = {
        "big": big,
        "again": big,  # the same tensor twice
        "transposed": torch.randn(200, 96, generator=g).T,  # dense, not contiguous
        "slice": torch.randn(96, 400, generator=g)[:, ::2],  # gaps: not dense
        "mask": torch.rand(300, 300, generator=g) > 0.5,
        "codes": torch.randint(-8, 8, (256, 512), dtype=torch.int8, generator=g),
        "small": torch.arange(5, dtype=torch.int16),
        "small_again": None,
        "small_transposed": torch.randn(3, 4, generator=g).bfloat16().T,
        "scalar": torch.tensor(1.5, dtype=torch.float64),
        "empty": torch.empty(0, 7),
        "box": Box("n", [stats, 3, None, (torch.ones(2), "x")]),
    }
    obj["small_again"] = obj["small"]
    return obj


def _assert_same(got, want):
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            _assert_same(got[k], want[k])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            _assert_same(a, b)
    elif isinstance(want, Box):
        assert got.name == want.name
        _assert_same(got.items, want.items)
    elif isinstance(want, InputStats):
        _assert_same(got.xtx, want.xtx)
        _assert_same(got.absmax, want.absmax)
        assert got.rows == want.rows and got.seen == want.seen
        _assert_same(list(got.cmin), list(want.cmin))
    else:
        assert got == want


def _check_layout(got):
    assert got["again"] is got["big"] and got["small_again"] is got["small"]
    assert got["transposed"].stride() == (1, 96) and got["small_transposed"].stride() == (1, 4)  # as sent
    assert got["slice"].is_contiguous()  # a view with gaps arrives compact


def test_large_tensors_leave_the_pickle_and_come_back_in_order():
    obj = _object()
    data, large = wire._pickled(obj)
    # the large ones: big (once), transposed, slice, mask, codes, X^T X and the cmin/cmax step buffers stay inside
    assert [tuple(t.shape) for t in large] == [(96, 200), (200, 96), (96, 200), (300, 300), (256, 512), (160, 160)]
    assert data.numel() < 16_000  # the small ones only (the large ones alone are 600 kB)
    queue = iter(large)

    def fetch(shape, dtype):
        t = next(queue)
        assert tuple(t.shape) == shape and t.dtype == dtype
        return t.clone()
    got = wire._unpickled(data, fetch, torch.device("cpu"))
    assert next(queue, None) is None  # every one asked for, once
    _assert_same(got, obj)
    _check_layout(got)


def _worker(rank, port, queue):
    import torch.distributed as dist

    from quant.calibration.ranks import Ranks
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ranks, obj = Ranks.current(), _object()
        mine = {"rank": rank, "obj": obj}
        gathered = ranks.gather(mine, dst=1, device="cpu")
        sent = ranks.broadcast(obj if rank == 0 else None, src=0, device="cpu")
        if rank == 1:
            assert gathered[1] is mine
            _assert_same(gathered[0], {"rank": 0, "obj": obj})
            _check_layout(gathered[0]["obj"])
            _assert_same(sent, obj)
            _check_layout(sent)
        else:
            assert gathered is None and sent is obj
        queue.put((rank, "ok"))
    except BaseException as e:
        queue.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def test_gather_and_broadcast_between_two_processes():
    assert run_gloo_workers(_worker) == {0: "ok", 1: "ok"}
