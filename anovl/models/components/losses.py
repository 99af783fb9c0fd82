"""Segmentation losses of the methods trained on auxiliary data (APRIL-GAN, AnomalyCLIP).

Both take probabilities, not logits: the methods apply a softmax over their normal/abnormal channel first,
and the losses are defined on those maps (Chen et al. 2023, APRIL-GAN §2.2; Zhou et al. 2024, AnomalyCLIP).
"""

from __future__ import annotations

import torch

from anovl.errors import AnovlError


def focal_loss(
    probabilities: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) of class probabilities, averaged over every pixel of the batch.

    Args:
        probabilities: ``B×C×H×W`` (or ``N×C``) probabilities over ``C`` classes (summing to 1 over dim 1).
        target: ``B×H×W`` (or ``N``) class indices (a binary mask is classes 0 and 1).
        gamma: focusing exponent; 0 gives the cross entropy.
        smooth: label smoothing and floor of the probability: the one-hot target is clamped to
            ``[smooth / (C - 1), 1 - smooth]`` and ``smooth`` is added to the target-class probability
            before the log, so a probability of 0 gives a finite loss (as the reference implementations do).

    Returns ``mean(-(1 - p_t)^gamma * log(p_t))`` with ``p_t`` the smoothed probability of the target class.
    """
    classes = probabilities.shape[1] if probabilities.ndim > 1 else 0
    if classes < 2 or target.shape != probabilities.shape[:1] + probabilities.shape[2:]:
        raise AnovlError(
            f"focal_loss takes B×C×... probabilities (C ≥ 2) and B×... targets, got "
            f"{tuple(probabilities.shape)} and {tuple(target.shape)}"
        )
    if not 0 <= smooth <= 1:
        raise AnovlError(f"focal_loss: smooth must lie in [0, 1], got {smooth}")
    p_t = _target_probability(probabilities, _class_weights(probabilities, target, smooth), smooth)
    return (-(1 - p_t).pow(gamma) * p_t.log()).mean()


def _class_weights(probabilities: torch.Tensor, target: torch.Tensor, smooth: float) -> list[torch.Tensor]:
    """Per class, each pixel's smoothed one-hot weight (``1 - smooth`` for its class, ``smooth / (C - 1)`` for the
    others). One map per class: no pixels × classes one-hot and no classes-last copy of the probabilities, which
    dominated a training step's memory at full resolution."""
    classes, index = probabilities.shape[1], target.long()
    low, high = (probabilities.new_tensor(v) for v in ((smooth / (classes - 1), 1.0 - smooth) if smooth else (0, 1)))
    return [torch.where(index == c, high, low) for c in range(classes)]


def _target_probability(probabilities: torch.Tensor, weights: list[torch.Tensor], smooth: float) -> torch.Tensor:
    """``p_t = Σ_c w_c p_c + smooth``: the smoothed probability of each pixel's class."""
    p_t = weights[0] * probabilities[:, 0]
    for c in range(1, len(weights)):
        p_t = p_t + weights[c] * probabilities[:, c]
    return p_t + smooth


def binary_dice_loss(probability: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of one probability map per image against its binary mask, averaged over the images.

    ``1 - mean_b (2 Σ p·t + smooth) / (Σ p + Σ t + smooth)``, sums over each image's pixels; ``smooth``
    keeps a normal image (empty mask) finite and rewards an all-low map for it.
    """
    if probability.shape != target.shape or probability.ndim < 1:
        raise AnovlError(
            f"binary_dice_loss takes a map and a mask of the same shape (B×...), got "
            f"{tuple(probability.shape)} and {tuple(target.shape)}"
        )
    flat, mask = probability.reshape(len(probability), -1), target.reshape(len(target), -1).to(probability.dtype)
    dice = (2 * (flat * mask).sum(1) + smooth) / (flat.sum(1) + mask.sum(1) + smooth)
    return 1 - dice.mean()


def softmax_focal_dice(
    scores: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5, dice_smooth: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`focal_loss` and :func:`binary_dice_loss` (of the abnormal channel) of ``softmax(scores, dim=1)``,
    for ``B×2×H×W`` normal/abnormal scores and a ``B×H×W`` binary mask, with the gradient written out: the
    backward keeps only the probabilities, where autograd keeps several full-size maps of the two losses."""
    if scores.ndim != 4 or scores.shape[1] != 2 or target.shape != scores.shape[:1] + scores.shape[2:]:
        raise AnovlError(
            f"softmax_focal_dice takes B×2×H×W scores and a B×H×W mask, got {tuple(scores.shape)} and "
            f"{tuple(target.shape)}"
        )
    return _SoftmaxFocalDice.apply(scores, target, gamma, smooth, dice_smooth)


class _SoftmaxFocalDice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, target, gamma, smooth, dice_smooth):  # type: ignore[override]
        probabilities = scores.softmax(dim=1)
        ctx.save_for_backward(probabilities, target)
        ctx.constants = gamma, smooth, dice_smooth
        return focal_loss(probabilities, target, gamma, smooth), binary_dice_loss(
            probabilities[:, 1], target, dice_smooth
        )

    @staticmethod
    def backward(ctx, focal_grad, dice_grad):  # type: ignore[override]
        probabilities, target = ctx.saved_tensors
        gamma, smooth, dice_smooth = ctx.constants
        abnormal = probabilities[:, 1]
        # Focal: loss = mean(-(1 - p_t)^γ log p_t), p_t = w_0 p_0 + w_1 p_1 + smooth (smoothed one-hot weights).
        weight_normal, weight_abnormal = weights = _class_weights(probabilities, target, smooth)
        p_t = _target_probability(probabilities, weights, smooth)
        rest = 1 - p_t
        d_p_t = (gamma * rest.pow(gamma - 1) * p_t.log() - rest.pow(gamma) / p_t) * (focal_grad / p_t.numel())
        # Dice of the abnormal channel: 1 - mean_b (2 Σ p t + s) / (Σ p + Σ t + s).
        mask = target.to(probabilities.dtype)
        sums = (2 * (abnormal * mask).flatten(1).sum(1) + dice_smooth)[:, None, None]
        totals = (abnormal.flatten(1).sum(1) + mask.flatten(1).sum(1) + dice_smooth)[:, None, None]
        d_abnormal = (sums - 2 * mask * totals) / totals.pow(2) * (dice_grad / len(probabilities))
        gradient = torch.stack([d_p_t * weight_normal, d_p_t * weight_abnormal + d_abnormal], dim=1)
        # Through the softmax over the two channels.
        return probabilities * (gradient - (gradient * probabilities).sum(1, keepdim=True)), None, None, None, None
