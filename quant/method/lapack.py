"""QR, SVD and the symmetric eigensolver for calibration, with bits that do not depend on the CPU thread count.

torch's CPU QR, SVD and symmetric eigensolver call LAPACK (MKL in the x86 wheels), which rounds
differently at different thread counts (QR and SVD at 2, 3, 4 and 8 threads against 1; eigh of a
48 x 48 matrix at 3 and 8). The LoRA loop turns such last-bit differences into different candidates
(re-quantizing W - L R flips a code that sits on a rounding boundary, and the warm-started fits
carry it on to the next alpha), and where two alphas' losses nearly tie, into another choice. Here
each factorisation of a CPU tensor runs at one thread and torch's count is restored after it; the
operands are small (bases of rank + 16 columns, p x in projections, one weight per layer in the
losses' set-up; the reference scheme's full SVD of W - Q is the largest). The products around them
(MKL's GEMMs at these shapes), the Cholesky factorisations and the triangular solves gave the same
bits at 1 to 8 threads and run as they are (MKL does split some smaller products differently at 3
threads: docs/METHOD.md §13). CUDA tensors are factorised as they are.
"""
import functools

import torch


def _one_cpu_thread(fn):
    @functools.wraps(fn)
    def call(a, *args, **kwargs):
        n = torch.get_num_threads()
        if a.device.type != "cpu" or n == 1:
            return fn(a, *args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(a, *args, **kwargs)
        finally:
            torch.set_num_threads(n)
    return call


qr = _one_cpu_thread(torch.linalg.qr)
svd = _one_cpu_thread(torch.linalg.svd)
eigh = _one_cpu_thread(torch.linalg.eigh)
