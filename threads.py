"""CPU threads for every entry point: never more than the cores this process may use, and waiting
threads that sleep instead of spinning.

Import this module before torch: torch's OpenMP runtime (libgomp) reads OMP_WAIT_POLICY once, when
it loads. Its default lets a waiting thread spin before it sleeps, which on a shared machine burns
the cores other processes need (measured on 2 cores with one busy competitor: 6x the wall time).
PASSIVE puts waiting threads to sleep at once; an explicit OMP_WAIT_POLICY in the environment wins.
The price is on a quiet machine: the calibration's many small parallel regions then pay a wake-up
each, so at 2 threads it runs about 2.6x longer than with spinning (bench/results/busy.md); next to
busy processes it is the one setting measured here whose CPU time did not grow (short spins,
GOMP_SPINCOUNT=10000, measured 1.2x once and 4.4x once). On a machine of your own,
OMP_WAIT_POLICY=ACTIVE in the environment gets the quiet speed back.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cores():
    """The cores this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads():
    """One thread per process under torchrun (several processes share the cores), else every core we may use."""
    procs = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)
    return 1 if procs > 1 else available_cores()


def set_threads(n=None):
    """torch's intra-op threads: n, or default_threads(); returns the number set."""
    import torch
    n = default_threads() if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        from quant.errors import UserError
        raise UserError(f"--threads must be a positive integer, got {n!r}")
    torch.set_num_threads(n)
    return n


def add_threads_arg(parser):
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of this process (default: the cores it may use, os.sched_getaffinity; "
                             "1 per process under torchrun)")
