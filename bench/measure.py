"""Measuring a model for the bench scripts: the bytes its modules hold, the rise of peak memory during one call
(CUDA's peak allocation or the peak RSS), and round-robin timing."""
import ctypes
import gc
import time

import torch

MB = 1e6


def _held_tensors(obj, depth):
    """The tensors obj holds: itself, or (depth levels down) in its dict values, list and tuple items and
    attributes (a dataclass of prepared operands); not inside other modules (model.modules() visits those)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth and not isinstance(obj, (torch.nn.Module, type, str, bytes)):
        items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else \
            vars(obj).values() if hasattr(obj, "__dict__") else ()
        for item in items:
            yield from _held_tensors(item, depth - 1)


def model_bytes(model):
    """Bytes of every tensor the model's modules keep: parameters, buffers (persistent or not) and tensors held
    in plain attributes (prepared kernel operands), each storage counted once (a view, a shared tensor)."""
    storages = {}
    for module in model.modules():
        for t in _held_tensors(vars(module), 4):
            s = t.untyped_storage()
            storages[(t.device, s.data_ptr())] = max(s.nbytes(), storages.get((t.device, s.data_ptr()), 0))
    return sum(storages.values())


def status_kb(field):
    """The value of `field` (kB) in /proc/self/status, 0 where absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_extra_mb(fn, device="cpu"):
    """Rise of peak memory during fn(): CUDA's peak allocation, or the peak RSS (VmHWM reset first; None where
    /proc/self/clear_refs is not writable)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MB
    _trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = status_kb("VmRSS")
    fn()
    return (status_kb("VmHWM") - before) * 1024 / MB


def time_round_robin(cases, reps, device="cpu"):
    """cases {name: fn} -> {name: sorted seconds}; one warm-up call each (CUDA: synchronized)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in cases.values():
        fn()
    times = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts) for name, ts in times.items()}
