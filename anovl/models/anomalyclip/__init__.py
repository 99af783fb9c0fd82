"""AnomalyCLIP (Zhou et al., ICLR 2024): learned object-agnostic prompts and DPAM, trained on auxiliary data."""

from anovl.models.anomalyclip.torch_model import AnomalyCLIP, AnomalyCLIPOutput, convert_authors_state_dict

__all__ = ["AnomalyCLIP", "AnomalyCLIPOutput", "convert_authors_state_dict"]
