"""Test-time adaptation of a small adapter on each image's patch tokens (docs/METHOD.md §5).

Default mode ``independent``: every image gets freshly initialised parameters from its own seed and
a fresh AdamW state, so its result depends on nothing but the image. Mode ``reference`` reproduces
the authors' code: images run one at a time, parameters drawn from the global RNG, and the AdamW
state carried over between the images of a category (results then depend on data order).

An image cut into tiles (VisA, METHOD §8) adapts as one: its tiles' tokens go through one adapter, and the
loss is taken per pixel on the stitched logit map (``pixel_logits``) instead of per token.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Sequence, get_args

import torch
import torch.nn.functional as F

from anovl.errors import AnovlError
from anovl.models.anovl.adapters import ADAPTERS, Adapter, check_adapter_args, create_adapter

Mode = Literal["independent", "reference"]
Corruption = Literal["token", "image"]
PseudoLabels = Literal["reference", "tfa_threshold"]
MODES, CORRUPTIONS, PSEUDO_LABELS = get_args(Mode), get_args(Corruption), get_args(PseudoLabels)


@dataclass
class TTAConfig:
    """Test-time adaptation settings; the defaults are the reference ones for MVTec.

    Args:
        adapter: the adapter trained on each image's tokens: ``text`` (reference, MVTec), ``linear``
            (reference, VisA), ``lowrank``, or any name registered with ``@register_adapter``.
        adapter_args: keyword arguments of the adapter, e.g. ``{rank: 16}`` for ``lowrank``.
        steps: optimisation steps per image (at least 1; for no TTA set ``tta: null``).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        noise_std: std of the Gaussian token noise of ``corruption: token``.
        entropy_weight: weight of the entropy term of the loss.
        pseudo_label_weight: weight of the pseudo-label terms of the loss.
        corruption: ``token`` adds Gaussian noise (std ``noise_std``) to the tokens at every step; ``image``
            uses the tokens of a corrupted copy of the image (the datamodule's ``corruption``).
        pseudo_labels: ``reference`` labels every clean token normal; ``tfa_threshold`` labels only the clean
            tokens TFA is confident about: below the per-image quantile ``normal_quantile`` of the TFA abnormal
            probability normal, above ``abnormal_quantile`` abnormal, the rest unlabelled.
        normal_quantile: see ``pseudo_labels``.
        abnormal_quantile: see ``pseudo_labels``.
        mode: ``independent`` gives every image fresh parameters and optimiser state (order-free);
            ``reference`` carries the optimiser state within a category as the authors' code does (results then
            depend on data order; one process, no ``--resume``).
        seed: seed of each image's initial adapter weights and noise (``independent`` mode).
        compile: run each adapter step (forward and loss; its backward follows) through ``torch.compile``
            (``independent`` mode only). Meant for small batches on a GPU, where launching the step's many small
            operations costs more than their arithmetic; the first batch of each shape pays the compilation.
    """

    adapter: str = "text"
    adapter_args: dict[str, Any] = field(default_factory=dict)
    steps: int = 5
    lr: float = 1e-3
    weight_decay: float = 0.01
    noise_std: float = 0.055
    entropy_weight: float = 1.0
    pseudo_label_weight: float = 0.5
    corruption: Corruption = "token"
    pseudo_labels: PseudoLabels = "reference"
    normal_quantile: float = 0.5
    abnormal_quantile: float = 0.95
    mode: Mode = "independent"
    seed: int = 0
    compile: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.adapter in ADAPTERS, f"tta.adapter must be one of {sorted(ADAPTERS)}, got {self.adapter!r}"),
            (self.steps >= 1, f"tta.steps must be at least 1 (got {self.steps}); to turn TTA off set tta: null"),
            (self.lr > 0, f"tta.lr must be positive, got {self.lr}"),
            (self.noise_std >= 0, f"tta.noise_std must be >= 0, got {self.noise_std}"),
            (self.mode in MODES, f"tta.mode must be one of {MODES}, got {self.mode!r}"),
            (self.corruption in CORRUPTIONS, f"tta.corruption must be one of {CORRUPTIONS}, got {self.corruption!r}"),
            (
                self.pseudo_labels in PSEUDO_LABELS,
                f"tta.pseudo_labels must be one of {PSEUDO_LABELS}, got {self.pseudo_labels!r}",
            ),
            (
                0 <= self.normal_quantile <= self.abnormal_quantile <= 1,
                "tta quantiles need 0 <= normal_quantile <= abnormal_quantile <= 1",
            ),
            (
                not (self.compile and self.mode == "reference"),
                "tta.compile applies to mode 'independent'; mode 'reference' runs the authors' steps as they are",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise AnovlError(message)
        check_adapter_args(self.adapter, self.adapter_args)


def recorded_settings(config: TTAConfig | None) -> dict[str, Any] | None:
    """The settings a run records (results.json, labels, grid fingerprints): every field but ``compile``, which
    changes how the steps run, not what they give (equal within 1e-5), so compiled and eager runs stay one variant."""
    if config is None:
        return None
    return {key: value for key, value in asdict(config).items() if key != "compile"}


PixelLogits = Callable[[torch.Tensor], torch.Tensor]  # per-token logits (B, N, 2) → per-pixel logits (B, P, 2)


def state_logits(tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """[x̂·t_n, x̂·t_a] per token (cosines, no temperature): tokens (B, N, D), states (B, 2, D) → (B, N, 2)."""
    return torch.einsum("bnd,bkd->bnk", F.normalize(tokens, dim=-1), states.to(tokens.dtype))


def state_log_probs(tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """log softmax([x̂·t_n, x̂·t_a]) per token: tokens (B, N, D), states (B, 2, D) → (B, N, 2)."""
    return state_logits(tokens, states).log_softmax(-1)


def tta_loss(
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    labels: torch.Tensor,
    entropy_weight: float,
    pseudo_label_weight: float,
) -> torch.Tensor:
    """Per-image loss (B,) from clean / corrupted log-probabilities (B, N, 2).

    entropy_weight · mean H(p^c) + pseudo_label_weight · (mean over labelled clean tokens of
    −log p^c(label) + mean over corrupted tokens of −log p^z(abnormal)). With every clean token
    labelled normal this is the reference loss H + 0.5·mean(−log p^c_n − log p^z_a).
    """
    entropy = -(clean.exp() * clean).sum(-1).mean(-1)
    labelled = labels >= 0
    clean_nll = -clean.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    clean_term = (clean_nll * labelled).sum(-1) / labelled.sum(-1).clamp_min(1)
    corrupted_term = -corrupted[..., 1].mean(-1)
    return entropy_weight * entropy + pseudo_label_weight * (clean_term + corrupted_term)


def adapter_step_losses(
    adapter: Adapter,
    tokens: torch.Tensor,
    corrupted: torch.Tensor,
    states: torch.Tensor,
    labels: torch.Tensor,
    pixel_logits: PixelLogits | None,
    entropy_weight: float,
    pseudo_label_weight: float,
) -> torch.Tensor:
    """One adaptation step's per-image losses (B,): the adapter on the clean and corrupted tokens, then
    :func:`tta_loss` on their state log-probabilities (per pixel with ``pixel_logits``)."""
    count = tokens.shape[1]
    logits = state_logits(adapter(torch.cat([tokens, corrupted], dim=1)), states)
    clean, noisy = logits[:, :count], logits[:, count:]
    if pixel_logits is not None:
        clean, noisy = pixel_logits(clean), pixel_logits(noisy)
    return tta_loss(clean.log_softmax(-1), noisy.log_softmax(-1), labels, entropy_weight, pseudo_label_weight)


@functools.cache
def compiled_step_losses() -> Callable[..., torch.Tensor]:
    """:func:`adapter_step_losses` through ``torch.compile``, made once: a fresh adapter of the same class and
    shapes reuses the compiled graph (its parameters are graph inputs)."""
    return torch.compile(adapter_step_losses)


def pseudo_labels(
    tokens: torch.Tensor, states: torch.Tensor, config: TTAConfig, pixel_logits: PixelLogits | None = None
) -> torch.Tensor:
    """Labels (B, N) for the clean tokens, or (B, P) for the pixels ``pixel_logits`` maps the tokens' logits to:
    0 normal, 1 abnormal, -1 unlabelled."""
    logits = state_logits(tokens, states)
    if pixel_logits is not None:
        logits = pixel_logits(logits)
    if config.pseudo_labels == "reference":
        return torch.zeros(logits.shape[:2], dtype=torch.long, device=tokens.device)
    abnormal = logits.softmax(-1)[..., 1]
    low = torch.quantile(abnormal, config.normal_quantile, dim=-1, keepdim=True)
    high = torch.quantile(abnormal, config.abnormal_quantile, dim=-1, keepdim=True)
    # torch.where, not a boolean index: that would wait for the device to count the selected tokens.
    return torch.where(abnormal > high, 1, torch.where(abnormal <= low, 0, -1))


class TestTimeAdaptation:
    """Runs TTA on the patch tokens of a batch; keeps the carried-over state of ``reference`` mode."""

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, config: TTAConfig):
        self.config = config
        self._carried: tuple[str, Adapter, torch.optim.Optimizer] | None = None
        self.last_losses: torch.Tensor | None = None  # (steps, B) per-image losses of the last call, for logging

    def reset(self) -> None:
        """Forget the carried-over reference-mode optimiser state (e.g. at the start of a run)."""
        self._carried = None

    def __call__(
        self,
        tokens: torch.Tensor,
        states: torch.Tensor,
        sentences: torch.Tensor,
        seeds: Sequence[int],
        categories: Sequence[str],
        corrupted_tokens: torch.Tensor | None = None,
        pixel_logits: PixelLogits | None = None,
    ) -> torch.Tensor:
        """Adapted tokens (B, N, D) from clean tokens (B, N, D), states (B, 2, D), sentences (B, M, D).

        With ``pixel_logits`` (per-token logits → per-pixel logits of the same images) the loss is the mean
        over those pixels, softmax taken per pixel; else over the tokens.
        """
        if self.config.corruption == "image" and corrupted_tokens is None:
            raise AnovlError(
                "tta.corruption is 'image' but the data gives no corrupted images; "
                "turn on the datamodule's corruption or use tta.corruption: token"
            )
        # Lightning runs test steps under inference mode; adaptation needs autograd on fresh tensors.
        with torch.inference_mode(False), torch.enable_grad():
            tokens = tokens.detach().clone().float()
            states = states.detach().clone().float()
            if corrupted_tokens is not None:
                corrupted_tokens = corrupted_tokens.detach().clone().float()
            if self.config.mode == "reference":
                results = [
                    self._adapt_reference(
                        tokens[i : i + 1],
                        states[i : i + 1],
                        sentences[i : i + 1],
                        categories[i],
                        None if corrupted_tokens is None else corrupted_tokens[i : i + 1],
                        pixel_logits,
                    )
                    for i in range(tokens.shape[0])
                ]
            else:
                results = [self._adapt_independent(tokens, states, sentences, seeds, corrupted_tokens, pixel_logits)]
        self.last_losses = torch.cat([losses for _, losses in results], dim=1)
        return torch.cat([adapted for adapted, _ in results])

    def _optimizer(self, adapter: Adapter) -> torch.optim.Optimizer:
        """AdamW; on CUDA in independent mode its fused kernel (one launch per step, not one per tensor op).
        Reference mode keeps PyTorch's default implementation, the authors' optimiser to the last bit."""
        parameters = list(adapter.parameters())
        fused = self.config.mode == "independent" and parameters[0].device.type == "cuda"
        return torch.optim.AdamW(
            parameters, lr=self.config.lr, weight_decay=self.config.weight_decay, fused=fused or None
        )

    def _adapt_independent(self, tokens, states, sentences, seeds, corrupted_tokens, pixel_logits):
        generators = [torch.Generator(device=tokens.device).manual_seed(int(seed)) for seed in seeds]
        adapter = create_adapter(
            self.config.adapter, tokens.shape[-1], sentences, generators, **self.config.adapter_args
        )

        def noise() -> torch.Tensor:
            return torch.stack(
                [torch.randn(tokens.shape[1:], generator=generator, device=tokens.device) for generator in generators]
            )

        return self._train(adapter, self._optimizer(adapter), tokens, states, corrupted_tokens, noise, pixel_logits)

    def _adapt_reference(self, tokens, states, sentences, category, corrupted_tokens, pixel_logits):
        if self._carried is None or self._carried[0] != category:
            adapter = create_adapter(self.config.adapter, tokens.shape[-1], sentences, None, **self.config.adapter_args)
            self._carried = (category, adapter, self._optimizer(adapter))
        else:
            adapter = self._carried[1]
            adapter.reset_parameters()
        return self._train(
            adapter, self._carried[2], tokens, states, corrupted_tokens, lambda: torch.randn_like(tokens), pixel_logits
        )

    def _train(self, adapter, optimizer, tokens, states, corrupted_tokens, noise, pixel_logits):
        """Adapt for ``config.steps`` steps; returns adapted tokens (B, N, D) and losses (steps, B)."""
        config = self.config
        labels = pseudo_labels(tokens, states, config, pixel_logits)
        step_losses = compiled_step_losses() if config.compile else adapter_step_losses
        history = []
        for _ in range(config.steps):
            corrupted = corrupted_tokens if config.corruption == "image" else tokens + config.noise_std * noise()
            losses = step_losses(
                adapter,
                tokens,
                corrupted,
                states,
                labels,
                pixel_logits,
                config.entropy_weight,
                config.pseudo_label_weight,
            )
            history.append(losses.detach())
            optimizer.zero_grad(set_to_none=True)
            # Summed over images so that each image's gradient is its own loss's gradient.
            losses.sum().backward()
            optimizer.step()
        with torch.no_grad():
            return adapter(tokens), torch.stack(history)
