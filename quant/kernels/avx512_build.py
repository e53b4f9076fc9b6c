"""Building and loading the DiTAS CPU kernel library (quant/kernels/csrc/) for quant/kernels/ops_avx512.py.

The C files (csrc/int_linear.c: the fused integer linear; csrc/alpha_search_bf16.c: the reference scheme's bf16
alpha-search losses; csrc/weight_quant.c: the LoRA loop's quantize-and-residual step; csrc/ditas_simd.h) are
compiled with the system C compiler (`$CC`, else gcc/cc) into one shared library in a cache directory
($DITAS_CACHE, else $XDG_CACHE_HOME/ditas, else ~/.cache/ditas), keyed by a hash of the sources, flags and compiler,
then loaded with ctypes (argument types from PROTOTYPES). Its OpenMP runtime is torch's own libgomp (same soname), so
its threads are torch's. Where there is no compiler, no AVX512-VNNI, or DITAS_CKERNEL=0, `load()` returns None and
`status()` says why.
"""
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess

import torch

from quant.io.files import atomic_path

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = tuple(os.path.join(CSRC, f) for f in ("int_linear.c", "alpha_search_bf16.c", "weight_quant.c"))
HEADERS = (os.path.join(CSRC, "ditas_simd.h"),)
NB = 32          # columns per packed block (both kernels)
QR = 4           # rows per LoRA block of ditas_encode
FLAGS = ("-O3", "-std=c11", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512bf16",
         "-fopenmp", "-shared", "-fPIC", f"-DDITAS_NB={NB}", f"-DDITAS_QR={QR}", f"-I{CSRC}")
_I, _P = ctypes.c_int64, ctypes.c_void_p
# The C entry points' parameters, by name, as declared in csrc/*.c (tests/test_kernels.py checks
# them against the C prototypes): int64_t -> c_int64, any pointer -> c_void_p.
PROTOTYPES = {
    "ditas_qgemm": (("M", _I), ("N", _I), ("Npad", _I), ("K", _I), ("G", _I), ("A", _P), ("lda", _I), ("Bp", _P),
                    ("sw", _P), ("cbd", _P), ("dq", _P), ("sa", _P), ("zx", _P), ("zs", _I), ("sx", _P), ("ss", _I),
                    ("lp", _P), ("lpld", _I), ("r", _I), ("Lt", _P), ("bias", _P), ("out", _P), ("ldo", _I),
                    ("out_bf16", _I), ("gelu", _I), ("nthreads", _I)),
    "ditas_qgemm_w4": (("M", _I), ("N", _I), ("Npad", _I), ("K", _I), ("G", _I), ("A", _P), ("lda", _I),
                       ("Bp4", _P), ("sw", _P), ("cbd", _P), ("dq", _P), ("sa", _P), ("zx", _P), ("zs", _I),
                       ("sx", _P), ("ss", _I), ("lp", _P), ("lpld", _I), ("r", _I), ("Lt", _P), ("bias", _P),
                       ("out", _P), ("ldo", _I), ("out_bf16", _I), ("gelu", _I), ("nthreads", _I)),
    "ditas_rowrange": (("M", _I), ("K", _I), ("x", _P), ("ldx", _I), ("x_bf16", _I), ("s", _P), ("mn", _P),
                       ("mx", _P), ("nthreads", _I)),
    "ditas_encode": (("M", _I), ("K", _I), ("x", _P), ("ldx", _I), ("x_bf16", _I), ("s", _P), ("scale", _P),
                     ("ss", _I), ("zero", _P), ("zs", _I), ("levels", _I), ("a", _P), ("G", _I), ("sa", _P),
                     ("Rt", _P), ("rpad", _I), ("lp", _P), ("scratch", _P), ("nthreads", _I)),
    "ditas_quant_residual": (("rows", _I), ("K", _I), ("G", _I), ("W", _P), ("LR", _P), ("levels", _I),
                             ("codes", _P), ("scale", _P), ("zero", _P), ("E", _P), ("nthreads", _I)),
    "ditas_ref_losses": (("n", _I), ("rows", _I), ("r0", _I), ("c", _I), ("w", _I), ("k", _I), ("x", _P),
                         ("s", _P), ("sc", _P), ("top", _P), ("Mp", _P), ("partner", _P), ("pw", _I), ("split", _I),
                         ("E", _P), ("part", _P), ("nthreads", _I)),
}


def _cache_dir():
    if os.environ.get("DITAS_CACHE"):
        return os.environ["DITAS_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ditas")


def _compiler():
    for cc in (os.environ.get("CC"), "gcc", "cc"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def _build(cc):
    """Path of the compiled library (built once per source/flags/compiler); raises OSError/CalledProcessError."""
    src = b"".join(open(f, "rb").read() for f in SOURCES + HEADERS)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(src + repr((FLAGS, cc, version)).encode()).hexdigest()[:16]
    cache = _cache_dir()
    path = os.path.join(cache, f"ditas_kernels-{key}.so")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        with atomic_path(path, suffix=".so") as tmp:  # build beside, rename: no half-written library
            subprocess.run([cc, *FLAGS, *SOURCES, "-o", tmp], capture_output=True, text=True, check=True)
    return path


@functools.lru_cache(maxsize=None)
def _load():
    """(library or None, reason)."""
    if os.environ.get("DITAS_CKERNEL", "1") == "0":
        return None, "disabled by DITAS_CKERNEL=0"
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None, f"CPU capability {torch.backends.cpu.get_cpu_capability()} (needs AVX512-VNNI)"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (set CC)"
    try:
        lib = ctypes.CDLL(_build(cc))
    except subprocess.CalledProcessError as e:
        last = (e.stderr or "").strip().splitlines()[-1:]
        return None, f"compiling {', '.join(map(os.path.basename, SOURCES))} failed: {last}"
    except OSError as e:
        return None, f"building or loading the kernel failed: {e}"
    if not lib.ditas_qgemm_supported():
        return None, "CPU lacks AVX512-VNNI"
    for name, params in PROTOTYPES.items():
        getattr(lib, name).argtypes = [ctype for _, ctype in params]
        getattr(lib, name).restype = None
    return lib, "ok"


def load():
    """The loaded library, or None where it cannot run here."""
    return _load()[0]


def status():
    """'ok' or why the fused kernel is not used."""
    return _load()[1]
