"""Oracle of the mask preprocessing (docs/METHOD.md §1): the reference's own torchvision pipeline.

A mask read as a 0/255 'L' image, torchvision's bilinear ``Resize``, ``ToTensor``, then > 0.5; checked against
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
