"""A sampling step of the integer backend reads nothing back to the host (no blocking sync per layer on CUDA), on
the torch-op path and on the Triton kernels (here in Triton's interpreter), W8A8 and packed W4A8, also for inputs
whose activation zero points take the int64 / float64 corrections."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU tensors

import pytest
import torch

from helpers import HostSyncs, quantize_blocks, random_dit
from quant.nn.int_linear import IntLinear, to_int_backend

torch.set_num_threads(1)


def _kernels():
    from quant.kernels import ops_triton
    return ["torch"] + (["triton"] if ops_triton.available() else [])


@pytest.mark.parametrize("kernel", _kernels())
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_integer_sampling_step_has_no_host_sync(kernel, bits, group):
    model = to_int_backend(quantize_blocks(random_dit(), bits, group, torch.Generator().manual_seed(0)), kernel)
    layers = [m for m in model.modules() if isinstance(m, IntLinear)]
    assert layers and all(m.runs == kernel for m in layers)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([999, 500, 10, 0]), torch.arange(4)
    with torch.no_grad():
        model(x, t, y)  # first call: lazy set-up (exactness probe of torch._int_mm, kernel compiles) may read back
        with HostSyncs() as syncs:
            model(x, t, y)
            model(x + 40.0, t, y)  # activations far from 0: extreme zero points, the wide corrections
    assert syncs.count == 0
