"""WinCLIP (Jeong et al., CVPR 2023), zero-shot: multi-scale window scoring with harmonic aggregation."""

from anovl.models.winclip.prompts import WinCLIPPrompts
from anovl.models.winclip.torch_model import WinCLIP, WinCLIPOutput

__all__ = ["WinCLIP", "WinCLIPOutput", "WinCLIPPrompts"]
