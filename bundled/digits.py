"""scikit-learn's handwritten digits as small RGB images: the bundled model's data.

The 8x8 digits (16 grey levels) are upsampled bilinearly to `size` x `size` and
repeated over 3 channels, so the pixel-space model and the ADM-format .npz files
look like any RGB image set.
"""
import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
# The flags that select the bundled model in every script (also the `flags:` line of assets/README.md).
BUNDLED_CKPT = "assets/dit_t2_digits16.safetensors"
BUNDLED_FLAGS = ["--model", "DiT-T/2", "--ckpt", BUNDLED_CKPT, "--image-size", str(IMAGE_SIZE),
                 "--num-classes", str(NUM_CLASSES), "--vae", "none"]


def load_digits_tensors(size=IMAGE_SIZE):
    """Return (images, labels): float32 N x 3 x size x size in [-1, 1], int64 N."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # N,1,8,8 in [0,1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).repeat(1, 3, 1, 1)
    return x.contiguous(), torch.from_numpy(d.target.astype(np.int64))
