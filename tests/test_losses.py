"""The focal and Dice losses against naive per-pixel loops written from their definitions."""

import math

import pytest
import torch

from anovl.errors import AnovlError
from anovl.models.components.losses import binary_dice_loss, focal_loss, softmax_focal_dice


def naive_focal(probabilities, target, gamma=2.0, smooth=1e-5):
    batch, classes = probabilities.shape[:2]
    total, count = 0.0, 0
    for b in range(batch):
        for index in range(probabilities[b, 0].numel()):
            label = int(target[b].reshape(-1)[index])
            p_t = smooth
            for c in range(classes):
                weight = 1 - smooth if c == label else smooth / (classes - 1)
                p_t += weight * float(probabilities[b, c].reshape(-1)[index])
            total += -((1 - p_t) ** gamma) * math.log(p_t)
            count += 1
    return total / count


def naive_dice(probability, target, smooth=1.0):
    scores = []
    for b in range(len(probability)):
        p, t = probability[b].reshape(-1).tolist(), target[b].reshape(-1).tolist()
        overlap = sum(x * y for x, y in zip(p, t))
        scores.append((2 * overlap + smooth) / (sum(p) + sum(t) + smooth))
    return 1 - sum(scores) / len(scores)


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_focal_loss_equals_its_definition(classes, gamma):
    generator = torch.Generator().manual_seed(classes)
    probabilities = torch.randn(3, classes, 4, 5, generator=generator, dtype=torch.float64).softmax(1)
    probabilities[0, :, 0, 0] = torch.tensor([1.0] + [0.0] * (classes - 1), dtype=torch.float64)  # certain
    target = torch.randint(0, classes, (3, 4, 5), generator=generator)
    target[0, 0, 0] = 1  # certain and wrong: finite thanks to the smoothing
    loss = focal_loss(probabilities, target, gamma=gamma)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(naive_focal(probabilities, target, gamma), rel=1e-12)
    # A float {0, 1} mask is the same target.
    if classes == 2:
        assert focal_loss(probabilities, target.double(), gamma=gamma).item() == pytest.approx(loss.item(), rel=1e-12)


def test_focal_loss_gradient_matches_the_definition():
    logits = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    target = (torch.rand(2, 3, 3) > 0.5).long()
    (grad,) = torch.autograd.grad(focal_loss(logits.softmax(1), target), logits)
    # The definition, vectorised differently: probability of the target class from a gather.
    probabilities = logits.softmax(1)
    p = probabilities.gather(1, target[:, None]).squeeze(1)
    p_t = (1 - 1e-5) * p + 1e-5 * (1 - p) + 1e-5
    (expected,) = torch.autograd.grad((-((1 - p_t) ** 2) * p_t.log()).mean(), logits)
    torch.testing.assert_close(grad, expected)


def test_dice_loss_equals_its_definition():
    generator = torch.Generator().manual_seed(0)
    probability = torch.rand(3, 4, 5, generator=generator, dtype=torch.float64)
    target = (torch.rand(3, 4, 5, generator=generator) > 0.6).double()
    target[1] = 0  # a normal image
    assert binary_dice_loss(probability, target).item() == pytest.approx(naive_dice(probability, target), rel=1e-12)
    # A perfect prediction of an empty mask costs nothing; of a full one almost nothing.
    assert binary_dice_loss(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)).item() == 0.0
    assert binary_dice_loss(torch.ones(1, 4, 4), torch.ones(1, 4, 4)).item() == pytest.approx(0.0)


def test_losses_refuse_mismatched_shapes():
    with pytest.raises(AnovlError, match="focal_loss takes"):
        focal_loss(torch.rand(2, 2, 4, 4), torch.zeros(2, 1, 4, 4))
    with pytest.raises(AnovlError, match="C ≥ 2"):
        focal_loss(torch.rand(2, 1, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(AnovlError, match="same shape"):
        binary_dice_loss(torch.rand(2, 4, 4), torch.zeros(2, 4, 5))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_softmax_focal_dice_equals_autograd_of_the_two_losses(dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    scores = (3 * torch.randn(3, 2, 6, 5, generator=generator, dtype=dtype)).requires_grad_()
    target = (torch.rand(3, 6, 5, generator=generator) > 0.6).to(dtype)
    target[2] = 0  # a normal image
    weights = torch.tensor([0.7, 1.3], dtype=dtype)  # unequal weights tell the two gradients apart
    focal, dice = softmax_focal_dice(scores, target)
    (gradient,) = torch.autograd.grad(weights[0] * focal + weights[1] * dice, scores)
    reference = scores.detach().clone().requires_grad_()
    probabilities = reference.softmax(1)
    expected_focal, expected_dice = focal_loss(probabilities, target), binary_dice_loss(probabilities[:, 1], target)
    (expected,) = torch.autograd.grad(weights[0] * expected_focal + weights[1] * expected_dice, reference)
    assert focal.item() == pytest.approx(expected_focal.item(), rel=tolerance)
    assert dice.item() == pytest.approx(expected_dice.item(), rel=tolerance)
    torch.testing.assert_close(gradient, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    with pytest.raises(AnovlError, match="B×2×H×W scores"):
        softmax_focal_dice(scores[:, :1], target)
