"""The calibration's FP sampling loops over several processes: which rank runs which chunks of the
noise batch, which layers it observes, and how the per-chunk results reach each layer's owner
(docs/METHOD.md §13).

ChunkedLoop: the fixed noise batch in `chunks` equal parts, advanced in lockstep: at every step each
chunk runs through the FP model in turn (chunk 0 first). Every statistic and search keeps one slot
per chunk (each fed its chunk's inputs, step after step) and merges them in chunk order once the
loop is done, so a result depends on `chunks` (the FP model's GEMM shapes, the merge), never on
which process ran which chunk. One chunk is the plain whole-batch loop.

Feed: one FP loop of one calibration round, two ways to share it among the ranks:

    by layers  (one chunk, or chunks no multiple of the ranks): every rank runs every chunk and
               observes its own layers. Nothing travels, but each rank pays the whole FP loop: the
               choice where the loop is cheap next to the candidates (GPUs).
    by chunks  (several ranks, `chunks` a multiple of them): rank r runs chunks r, r + W, ... and
               observes every layer of the round. After the loop the per-chunk statistics and
               losses travel to each layer's owner, one layer at a time (a few numbers per layer
               for the losses, X^T X for the shortlist's statistics; large tensors raw, the rest
               pickled: quant/calibration/wire.py); before the scoring
               pass every layer's kept candidates go to every rank (codes, scales, LoRA; not the
               FP weight, which every rank has). The FP work and the observation divide; each rank
               holds the whole round's statistics and candidates.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from quant.calibration.ranks import Ranks


@dataclass(frozen=True)
class LoopShape:
    """What one chunk of an FP calibration loop feeds each quantized layer: `steps` sampling steps, each of
    `rows` batch rows (the chunk's samples, doubled by classifier-free guidance) of `tokens` tokens. The
    memory budget's per-step statistics depend on it (quant/calibration/budget.py range_bytes)."""
    steps: int
    rows: int
    tokens: int


@dataclass(frozen=True)
class ChunkedLoop:
    """run(indices): one FP sampling loop of the listed chunks (ascending) of a fixed noise batch split
    into `chunks` equal parts, advanced in lockstep (see the module docstring); shape: each chunk's
    LoopShape, where known (the memory budget then counts the per-step statistics)."""
    run: Callable
    chunks: int = 1
    shape: LoopShape | None = None

    def __post_init__(self):
        if isinstance(self.chunks, bool) or not isinstance(self.chunks, int) or self.chunks < 1:
            raise ValueError(f"calibration chunks must be a positive integer, got {self.chunks!r}")

    def __call__(self):
        """The whole loop: every chunk (returns what run returns: fp_calibration_loop's final samples)."""
        return self.run(range(self.chunks))

    @classmethod
    def of(cls, loop):
        """A ChunkedLoop as is; a plain callable loop() as one chunk (the whole batch)."""
        return loop if isinstance(loop, cls) else cls(lambda indices: loop(), 1)


def by_chunks(world, chunks):
    """Do `world` processes divide an FP loop of `chunks` chunks among them (else each runs every chunk)?"""
    return world > 1 and chunks % world == 0


def run_hooked(layers, fn, loop, outputs=False):
    """Run loop() with fn(name, x) observing every layer's input ({name: module}), or fn(name, x, y) with
    its output y too (outputs=True: called after the layer ran); hooks are always removed."""
    def hook(name):
        def observe(module, inputs, *output):
            fn(name, inputs[0], *output)  # returning None leaves the input (output) untouched
        return observe
    register = "register_forward_hook" if outputs else "register_forward_pre_hook"
    handles = [getattr(lin, register)(hook(name)) for name, lin in layers.items()]
    try:
        with torch.no_grad():
            loop()
    finally:
        for h in handles:
            h.remove()


class Feed:
    """The FP loop of one round. shares: [each rank's layer names in the round] (the same on every rank);
    modules: {name: module} holding at least those layers.

    chunks: the chunks this rank runs; observed: the layer names it observes; owners: {name: rank}; runs: the
    FP loops run so far. run(fn, outputs=False): one FP loop, fn(name, chunk, x) (or fn(name, chunk, x, y)
    with the layer's output, outputs=True) for each observed layer, once per chunk and step. to_owners(parts)
    and share(objects) are collectives: every rank calls them at the same point."""

    def __init__(self, loop, ranks, modules, shares):
        self.loop, self.ranks = ChunkedLoop.of(loop), ranks
        self.owners = {name: r for r, names in enumerate(shares) for name in names}
        world, c = ranks.world, self.loop.chunks
        self.by_chunks = by_chunks(world, c)
        self.chunks = list(range(ranks.rank, c, world)) if self.by_chunks else list(range(c))
        self.observed = [n for n, r in self.owners.items() if self.by_chunks or r == ranks.rank]
        self.modules = {name: modules[name] for name in self.observed}
        self.device = next((m.weight.device for m in modules.values()), torch.device("cpu"))
        self.runs = 0

    def observing(self):
        """What this rank observes, for the progress lines."""
        chunks = f" on {len(self.chunks)} of the {self.loop.chunks} chunks" if self.by_chunks else ""
        return f"{len(self.observed)} layers observed{chunks}"

    @classmethod
    def local(cls, loop, modules):
        """This process alone observing `modules` ({name: module})."""
        return cls(loop, Ranks(), modules, [list(modules)])

    def run(self, fn, outputs=False):
        self.runs += 1
        calls = dict.fromkeys(self.observed, 0)

        def observe(name, *tensors):  # every layer runs once per forward: its k-th call is chunk k mod n
            k = calls[name]
            calls[name] = k + 1
            fn(name, self.chunks[k % len(self.chunks)], *tensors)
        run_hooked(self.modules, observe, lambda: self.loop.run(self.chunks), outputs)

    def to_owners(self, parts):
        """{name: [its parts in chunk order]} of this rank's own layers, from parts {name: {chunk: part}}
        over the observed layers (by chunks: every rank's parts sent to the owner, one layer at a time,
        each sent part dropped here: DiT-XL/2's X^T X of every layer at once did not fit in memory)."""
        rank = self.ranks.rank
        if not self.by_chunks:
            return {n: [d[c] for c in sorted(d)] for n, d in parts.items() if self.owners[n] == rank}
        self.ranks.check_in()  # a rank that failed in the loop stops every rank here
        merged = {}
        for name in self.observed:  # the same order on every rank
            owner, mine = self.owners[name], parts.pop(name)
            got = self.ranks.gather(mine, owner, self.device)
            if got is not None:
                merged[name] = {c: part for theirs in got for c, part in theirs.items()}
        return {n: [d[c] for c in sorted(d)] for n, d in merged.items()}

    def share(self, objects):
        """{name: object} of every observed layer, from this rank's own layers' objects (by chunks: every
        rank's, sent one layer at a time)."""
        if not self.by_chunks:
            return dict(objects)
        self.ranks.check_in()
        every = {}
        for name in self.observed:
            owner = self.owners[name]
            every[name] = self.ranks.broadcast(objects[name] if owner == self.ranks.rank else None, owner,
                                               self.device)
        return every


def merge(parts):
    """One statistic from its parts in chunk order (type(part).merge; a single part as is)."""
    return parts[0] if len(parts) == 1 else type(parts[0]).merge(parts)


def as_feed(loop, modules):
    """A Feed as is; a loop (callable or ChunkedLoop) as this process alone observing `modules`."""
    return loop if isinstance(loop, Feed) else Feed.local(loop, modules)


def collect_statistics(layers, loop, make):
    """Pass 1: {name: statistic} of this rank's `layers`, statistic = make() updated on every step's
    input of the layer (one per chunk of the batch, merged in chunk order); loop: a Feed or a loop."""
    feed = as_feed(loop, layers)
    parts = {name: {c: make() for c in feed.chunks} for name in feed.observed}
    feed.run(lambda name, chunk, x: parts[name][chunk].update(x))
    return {name: merge(p) for name, p in feed.to_owners(parts).items()}
