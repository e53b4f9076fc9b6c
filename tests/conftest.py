import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, torch.get_num_threads()))

BUNDLED_CKPT = os.path.join(ROOT, "assets", "dit_t2_digits16.safetensors")
BUNDLED_FLAGS = ["--model", "DiT-T/2", "--ckpt", BUNDLED_CKPT, "--image-size", "16", "--num-classes", "10",
                 "--vae", "none"]


@pytest.fixture
def root():
    return ROOT
