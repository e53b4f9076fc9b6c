"""Calibration over several processes (torchrun; gloo on CPU, nccl on CUDA): which layers each rank
calibrates, and how the ranks agree (docs/METHOD.md §13).

Each rank calibrates its share of the layers; the FP sampling loops of the same fixed noise are
either run by every rank or divided among them by chunks of the batch (quant/calibration/feed.py); rank 0
gathers the chosen layers and writes the checkpoint. A layer's result depends on its own inputs
only, so at equal thread settings the checkpoint is byte-identical to a single process's. The
ranks meet at a few points (`together`, `check_in`): there a failure on any rank stops all of
them with that rank's error, named once.
"""
import sys
import traceback

import torch.distributed as dist

from quant.calibration import wire
from quant.errors import UserError


class RankFailed(UserError):
    """Another rank (or this one) failed; the message names the rank and its error."""


class Ranks:
    """This process's place among the calibrating processes: Ranks() is a single process."""

    def __init__(self, rank=0, world=1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.rank, self.world = rank, world

    @classmethod
    def current(cls):
        """The torch.distributed process group's ranks (a single process when there is none)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def share(self, costs):
        """This rank's layer names (in calibration order) from {name: cost}: largest first, each to the
        least loaded rank (ties to the lower rank, then the earlier layer). Deterministic."""
        if self.world > len(costs):
            raise ValueError(f"{self.world} calibration processes but only {len(costs)} layers to calibrate: "
                             f"start at most {len(costs)}")
        order = list(costs)
        load = [0] * self.world
        owner = {}
        for name in sorted(order, key=lambda n: (-costs[n], order.index(n))):
            r = min(range(self.world), key=lambda i: (load[i], i))
            owner[name] = r
            load[r] += costs[name]
        return [n for n in order if owner[n] == self.rank]

    def _all_gather(self, obj):
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all(self, value):
        """[every rank's value] (a picklable object)."""
        return [value] if self.world == 1 else self._all_gather(value)

    def agree(self, settings, what="settings"):
        """Raise RankFailed on every rank unless every rank passed equal `settings` ({key: value})."""
        if self.world == 1:
            return
        every = self._all_gather(settings)
        for r, theirs in enumerate(every):
            if theirs != every[0]:
                keys = sorted(k for k in set(theirs) | set(every[0]) if theirs.get(k) != every[0].get(k))
                raise RankFailed(f"rank {r} was started with other {what} than rank 0 (differing: "
                                 f"{', '.join(map(str, keys))}); start every rank with the same command")

    def together(self, fn):
        """fn() on every rank; if it raised anywhere, every rank raises RankFailed naming the first failed
        rank's error (its traceback printed once, by that rank, unless it was a UserError/ValueError)."""
        if self.world == 1:
            return fn()
        error = None
        try:
            result = fn()
        except RankFailed:  # already agreed: every rank raises it at the same point
            raise
        except (UserError, ValueError) as e:
            error, result = f"{e}", None
        except Exception as e:  # a defect or an out-of-memory: the failing rank shows where
            traceback.print_exc(file=sys.stderr)
            error, result = f"{type(e).__name__}: {e}", None
        self._raise_failed(self._all_gather(error))
        return result

    def check_in(self):
        """A meeting point inside a `together` call, before work that every rank must do together (a
        shared FP loop): RankFailed on every rank if one arrives from a failure instead (its `together`'s
        exchange meets this one)."""
        if self.world > 1:
            self._raise_failed(self._all_gather(None))

    def _raise_failed(self, errors):
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if len(failed) == self.world and len(set(errors)) == 1:
            raise RankFailed(errors[0])  # the same error everywhere (e.g. an input every rank checks)
        if failed:
            r, message = failed[0]
            raise RankFailed(f"calibration rank {r} of {self.world} failed: {message}")

    def gather(self, obj, dst=0, device="cpu"):
        """dst: [every rank's obj] (its own as is, the others' tensors on `device`); other ranks: None.
        Large tensors travel raw (quant/calibration/wire.py)."""
        if self.world == 1:
            return [obj]
        if self.rank != dst:
            wire.send(obj, dst)
            return None
        return [obj if r == dst else wire.recv(r, device) for r in range(self.world)]

    def broadcast(self, obj, src, device="cpu"):
        """src's obj on every rank (obj itself on src; elsewhere its tensors on `device`; pass None there)."""
        return obj if self.world == 1 else wire.broadcast(obj, src, device)
