import os
import sys

# the Triton kernels' tests run them in Triton's CPU interpreter (read when triton is imported)
os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ditas import threads  # noqa: E402,F401  (OpenMP's wait settings, before torch loads it)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def root():
    return ROOT
