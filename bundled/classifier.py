"""A small CNN digit classifier whose features stand in for Inception in the evaluator.

Pretrained Inception weights cannot be downloaded offline, so FID / sFID / IS /
precision / recall of the bundled digits model are measured in the feature space
of this classifier instead (`evaluator.py --features digits`):

    'pool'    global average of the last conv map  ~ Inception pool_3 (FID, precision, recall)
    'spatial' first 4 channels of the 8x8 conv map  ~ mixed_6/conv first 7 channels (sFID)
    'logits'  10-way class logits                   ~ Inception logits (IS)

Input: float images in [-1, 1], N x 3 x 16 x 16 (see `uint8_to_input` for .npz batches).
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                            "digits_classifier.safetensors")
SPATIAL_CHANNELS = 4  # 4 x 8 x 8 = 256-d: small enough for a covariance over ~1.8K reference digits


class DigitClassifier(nn.Module):
    """Four 3x3 convs and a global average pool, a miniature of Inception's layout."""

    def __init__(self, num_classes=10, width=32, feature_dim=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)                    # 16x16
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)      # 8x8 -> 'spatial'
        self.conv3 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)  # 4x4
        self.conv4 = nn.Conv2d(2 * width, feature_dim, 3, padding=1)      # 4x4 -> average -> 'pool'
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x):
        """All three evaluator features from one pass (the classifier's analogue of Inception's taps)."""
        h = F.relu(self.conv1(x))
        s = F.relu(self.conv2(h))
        h = F.relu(self.conv4(F.relu(self.conv3(s))))
        pool = h.mean(dim=(2, 3))
        # NHWC flattening like ADM's reshape of the TF mixed_6/conv tensor.
        spatial = s[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        return {"pool": pool, "spatial": spatial, "logits": self.head(pool)}

    def forward(self, x):
        return self.features(x)["logits"]


def uint8_to_input(images):
    """ADM-format uint8 N x H x W x 3 batch (numpy or tensor) -> float N x 3 x H x W in [-1, 1]."""
    return (torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous()


def load_classifier(path=DEFAULT_PATH):
    """Load the bundled classifier (safetensors, no pickled code) in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    model = DigitClassifier(**{k: int(meta[k]) for k in ("num_classes", "width", "feature_dim") if k in meta})
    model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def label_accuracy(images_uint8, labels, classifier=None):
    """Fraction of images (uint8 NHWC) that the bundled classifier assigns to their conditioning label."""
    classifier = classifier or load_classifier()
    x = uint8_to_input(images_uint8)
    pred = torch.cat([classifier(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((pred.cpu() == torch.as_tensor(labels).cpu()).float().mean())
