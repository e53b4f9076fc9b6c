"""CPU threads for every entry point: how many, and how OpenMP's idle threads wait.

Import this module before torch: torch's OpenMP runtime (libgomp) reads OMP_WAIT_POLICY once, when
it loads, so the wait policy is chosen here, at import.

How many (default_threads, for a script without --threads): what OMP_NUM_THREADS / MKL_NUM_THREADS
say when either is set (torch's own reading of them, torch.get_num_threads()); else one thread per
process under torchrun (several processes share the cores); else every core of the affinity mask
(os.sched_getaffinity: a container's or taskset's share).

How they wait (choose_wait_policy): an OMP_WAIT_POLICY in the environment wins. Otherwise the
choice is made once, from how busy this process's cores are when it starts: the CPU time other
processes spend on them over 0.1 s (/proc/stat, per core of the affinity mask). When the cores left
idle are fewer than the threads this process will run, OMP_WAIT_POLICY=PASSIVE: a waiting thread
sleeps at once, instead of spinning on a core that a descheduled peer or another process needs.
When they suffice, libgomp's default stays (spin a while, then sleep), so the calibration's many
short parallel regions start without a wake-up each. bench/studies/busy.py measures both cases. Where
/proc/stat cannot be read, PASSIVE. A machine that becomes busy after the start keeps the choice;
set OMP_WAIT_POLICY to decide for yourself.
"""
import os
import sys
import time

LOAD_WINDOW_S = 0.1  # how long the start-up measurement of the other processes' CPU use lasts


def available_cores():
    """The cores this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def env_threads(env=os.environ):
    """The positive thread count OMP_NUM_THREADS or MKL_NUM_THREADS sets (MKL's wins, as in torch), else None."""
    found = None
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        try:
            n = int(env.get(var, "").split(",")[0])
        except ValueError:
            continue
        found = n if n > 0 else found
    return found


def torchrun_procs(env=os.environ):
    """Processes on this machine under torchrun (LOCAL_WORLD_SIZE, else WORLD_SIZE), 1 otherwise."""
    return int(env.get("LOCAL_WORLD_SIZE") or env.get("WORLD_SIZE") or 1)


def planned_threads(env=os.environ):
    """The threads a script runs by default, known before torch loads: what OMP_NUM_THREADS / MKL_NUM_THREADS set
    (read as torch reads them, env_threads), else one per process under torchrun, else every core we may use."""
    n = env_threads(env)
    if n is not None:
        return n
    return 1 if torchrun_procs(env) > 1 else available_cores()


def default_threads():
    """--threads' default: planned_threads() of this process's environment."""
    return planned_threads()


def _cpu_ticks(cpus):
    """(busy, total) clock ticks of the given cores since boot, from /proc/stat."""
    busy = total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in values[:8])
            busy += user + nice + system + irq + softirq + steal
            total += user + nice + system + idle + iowait + irq + softirq + steal
    return busy, total


def busy_cores(window=LOAD_WINDOW_S):
    """How many of this process's cores other processes kept busy over `window` seconds (this one sleeps
    meanwhile), e.g. 1.0 for one spinning competitor; None where /proc/stat cannot be read."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    try:
        busy0, total0 = _cpu_ticks(cpus)
        time.sleep(window)
        busy1, total1 = _cpu_ticks(cpus)
    except (OSError, ValueError):
        return None
    if total1 <= total0:
        return None
    return len(cpus) * (busy1 - busy0) / (total1 - total0)


def choose_wait_policy(env, busy, cores, threads):
    """OMP_WAIT_POLICY to set (None: keep the environment's or libgomp's default). busy: cores other processes
    use (None: unknown); the threads sleep at once when fewer than `threads` cores are left idle (half a core
    of slack: a quiet machine's background noise does not count)."""
    if env.get("OMP_WAIT_POLICY"):
        return None
    if busy is None or cores - busy < threads - 0.5:
        return "PASSIVE"
    return None


def wait_policy():
    """The policy in force: OMP_WAIT_POLICY's value, or "spin-then-sleep" (libgomp's default)."""
    return os.environ.get("OMP_WAIT_POLICY", "spin-then-sleep")


def _configure_wait_policy():
    if os.environ.get("OMP_WAIT_POLICY") or "torch" in sys.modules:  # decided, or too late to matter
        return
    policy = choose_wait_policy(os.environ, busy_cores(), available_cores(), planned_threads())
    if policy is not None:
        os.environ["OMP_WAIT_POLICY"] = policy


_configure_wait_policy()


def set_threads(n=None):
    """torch's intra-op threads: n, or default_threads(); returns the number set."""
    import torch

    from ditas.cli import check_positive
    n = check_positive(default_threads() if n is None else n, "--threads")
    torch.set_num_threads(n)
    return n


def add_threads_arg(parser):
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of this process (default: OMP_NUM_THREADS or MKL_NUM_THREADS when set; "
                             "else 1 per process under torchrun; else the cores it may use, os.sched_getaffinity)")
