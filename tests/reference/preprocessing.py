"""Oracle of the preprocessing (docs/METHOD.md §1): the reference's own torchvision pipeline.

An image: torchvision's bilinear ``Resize``, ``ToTensor`` and ``Normalize`` with CLIP's statistics. A mask read as a 0/255 'L' image, torchvision's bilinear ``Resize``, ``ToTensor``, then > 0.5; checked against
the datamodules' masks in tests/test_data.py. It imports numpy, Pillow and torchvision only: keep it
independent of anovl.data.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T


def reference_mask(path, size_hw, nonzero=False) -> torch.Tensor:
    """docs/METHOD.md §1 via torchvision: 0/255 'L' image, bilinear Resize, ToTensor, > 0.5 (float S×S).
    ``nonzero``: any non-zero value is anomalous (instead of > 127)."""
    values = np.asarray(Image.open(path).convert("L"))
    binary = Image.fromarray(((values > (0 if nonzero else 127)) * 255).astype(np.uint8), mode="L")
    return (T.Compose([T.Resize(size_hw), T.ToTensor()])(binary)[0] > 0.5).float()


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def reference_image(path, size_hw) -> torch.Tensor:
    """docs/METHOD.md §1 via torchvision: RGB, bilinear Resize, ToTensor, Normalize (float 3×H×W)."""
    transform = T.Compose([T.Resize(size_hw), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    return transform(Image.open(path).convert("RGB"))
