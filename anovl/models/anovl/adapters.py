"""Test-time adapters (docs/METHOD.md §5) behind a registry; a new variant is one registered class.

Every adapter holds one independent set of parameters per image, stacked along dim 0, so a batch
adapts in parallel while each image keeps its own weights (AdamW is elementwise, so one optimiser
over stacked parameters equals one optimiser per image).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from anovl.errors import AnovlError
from anovl.registry import Registry

ADAPTERS: Registry[str, type["Adapter"]] = Registry("TTA adapter", "a plugin adds one with @register_adapter(name)")
A = TypeVar("A", bound=type["Adapter"])


def register_adapter(name: str) -> Callable[[A], A]:
    """Class decorator: make an adapter selectable by ``name`` (e.g. ``tta.adapter: name`` in YAML)."""

    def decorator(cls: A) -> A:
        cls.name = name
        ADAPTERS.register(name, cls, stacklevel=2)
        return cls

    return decorator


def create_adapter(
    name: str, dim: int, sentences: torch.Tensor, generators: Sequence[torch.Generator] | None = None, **kwargs: Any
) -> "Adapter":
    return ADAPTERS.lookup(name)(dim, sentences, generators, **kwargs)


def check_adapter_args(name: str, args: dict[str, Any]) -> None:
    """One clear error where ``args`` do not fit the adapter's constructor (checked with the config, before any
    data is read, instead of a traceback at the first batch)."""
    cls = ADAPTERS.lookup(name)
    if not isinstance(args, dict):
        raise AnovlError(f"tta.adapter_args must be a mapping of argument names to values, got {args!r}")
    parameters = list(inspect.signature(cls.__init__).parameters.values())[4:]  # after self, dim, sentences, generators
    takes = (
        ", ".join(
            parameter.name
            for parameter in parameters
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        )
        or "no arguments"
    )
    try:
        inspect.signature(cls.__init__).bind(None, 0, None, None, **args)
    except TypeError as error:
        raise AnovlError(f"tta.adapter_args do not fit the {name!r} adapter ({error}); it takes: {takes}") from None


def _linear_init_(weight: torch.Tensor, bias: torch.Tensor | None, generator: torch.Generator | None) -> None:
    """``nn.Linear.reset_parameters`` (the reference's default init), with an optional generator."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    if bias is not None:
        bound = 1 / math.sqrt(weight.shape[1]) if weight.shape[1] else 0.0
        nn.init.uniform_(bias, -bound, bound, generator=generator)


class BatchedLinear(nn.Module):
    """A stack of independent ``nn.Linear`` layers, one per image."""

    def __init__(
        self, batch: int, in_features: int, out_features: int, bias: bool = True, device: torch.device | None = None
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(batch, out_features, in_features, device=device))
        self.bias = nn.Parameter(torch.empty(batch, out_features, device=device)) if bias else None

    @torch.no_grad()
    def reset_parameters(self, generators: Sequence[torch.Generator | None]) -> None:
        for index, generator in enumerate(generators):
            _linear_init_(self.weight[index], None if self.bias is None else self.bias[index], generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, in) → (B, N, out)
        out = torch.bmm(x, self.weight.transpose(1, 2))
        return out if self.bias is None else out + self.bias.unsqueeze(1)


class Adapter(nn.Module):
    """Maps patch tokens (B, N, D) to adapted tokens, with per-image parameters.

    ``sentences``: (B, M, D) per-sentence normalised text embeddings of each image's category.
    ``generators``: one per image for order-independent initialisation, or None for the global RNG.
    """

    name: str

    def __init__(self, dim: int, sentences: torch.Tensor, generators: Sequence[torch.Generator] | None):
        super().__init__()
        self.batch = sentences.shape[0]
        self.dim = dim

    def reset_parameters(self, generators: Sequence[torch.Generator | None] | None = None) -> None:
        generators = generators if generators is not None else [None] * self.batch
        for module in self.modules():
            if isinstance(module, BatchedLinear):
                module.reset_parameters(generators)


@register_adapter("text")
class TextAdapter(Adapter):
    """Reference TextAdapter: x̃ = ½x + ½·tanh(W·normalize(x) + b)·T over the frozen sentence embeddings T."""

    sentences: torch.Tensor  # the buffer, declared so that its type is known

    def __init__(self, dim, sentences, generators):
        super().__init__(dim, sentences, generators)
        # Its own copy: the input may be a view of cached embeddings or an inference-mode tensor.
        self.register_buffer("sentences", sentences.detach().clone(), persistent=False)
        self.linear = BatchedLinear(self.batch, dim, sentences.shape[1], device=sentences.device)
        self.reset_parameters(generators)

    def forward(self, x):
        weights = torch.tanh(self.linear(F.normalize(x, dim=-1)))
        return 0.5 * x + 0.5 * torch.bmm(weights, self.sentences.to(x.dtype))


@register_adapter("linear")
class LinearAdapter(Adapter):
    """Reference Adapter: x̃ = ½x + ½(W·normalize(x) + b), W ∈ R^{D×D}."""

    def __init__(self, dim, sentences, generators):
        super().__init__(dim, sentences, generators)
        self.linear = BatchedLinear(self.batch, dim, dim, device=sentences.device)
        self.reset_parameters(generators)

    def forward(self, x):
        return 0.5 * x + 0.5 * self.linear(F.normalize(x, dim=-1))


@register_adapter("lowrank")
class LowRankResidualAdapter(Adapter):
    """New variant: x̃ = x + ‖x‖·U·V·normalize(x) with rank r and U zero-initialised.

    Starting at the identity, adaptation begins from the TFA map instead of a random mix, and the
    rank-r update has far fewer parameters than the D×D linear adapter.
    """

    def __init__(self, dim, sentences, generators, rank: int = 16):
        super().__init__(dim, sentences, generators)
        if rank < 1:
            raise AnovlError(f"lowrank adapter: rank must be at least 1, got {rank}")
        self.down = BatchedLinear(self.batch, dim, rank, bias=False, device=sentences.device)
        self.up = BatchedLinear(self.batch, rank, dim, bias=False, device=sentences.device)
        self.reset_parameters(generators)

    def reset_parameters(self, generators=None):
        super().reset_parameters(generators)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        norm = x.norm(dim=-1, keepdim=True)
        return x + norm * self.up(self.down(x / norm.clamp_min(1e-12)))
