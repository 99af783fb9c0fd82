"""Device placement of the forward pass, checked without a GPU.

PyTorch's fake tensors carry a device and raise on mixing devices as real CUDA does, without allocating or
computing anything, so a tensor created on the CPU inside ``AnoVL.forward`` fails here as it would on a GPU.
TTA is not covered: its backward pass needs a real CUDA context.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from anovl.errors import AnovlError
from anovl.models.anovl.views import make_views


def _to_fake_cuda(module: torch.nn.Module, mode: FakeTensorMode) -> None:
    # Module.to() cannot swap real parameters for fake ones, so each is replaced in place.
    for submodule in module.modules():
        for name, parameter in submodule._parameters.items():
            if parameter is not None:
                fake = mode.from_tensor(parameter.detach()).to("cuda")
                submodule._parameters[name] = torch.nn.Parameter(fake, requires_grad=parameter.requires_grad)
        for name, buffer in submodule._buffers.items():
            if buffer is not None:
                submodule._buffers[name] = mode.from_tensor(buffer).to("cuda")


@pytest.fixture
def fake_cuda_model(tiny_model):
    tiny_model.text_states("bottle")  # encoded for real on the CPU, as the cache would hold them
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        _to_fake_cuda(tiny_model, mode)
        yield tiny_model


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_forward_keeps_every_tensor_on_the_images_device(fake_cuda_model, precision):
    images = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=precision, enabled=precision is not None):
        output = fake_cuda_model(images, ["bottle", "bottle"])
    tensors = {name: value for name, value in vars(output).items() if isinstance(value, torch.Tensor)}
    tensors.update({f"patch_tokens[{index}]": value for index, value in enumerate(output.patch_tokens)})
    assert {name: value.device.type for name, value in tensors.items()} == {name: "cuda" for name in tensors}
    assert output.anomaly_map.shape == (2, 64, 64) and output.pred_score.shape == (2,)


def test_the_check_sees_a_tensor_left_on_the_cpu():
    """Control: fake CUDA mode does raise where a CPU tensor meets a CUDA one (as views with CPU grids would)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        images = torch.randn(2, 3, 16, 16, device="cuda")
        assert make_views(images, 3).device.type == "cuda"
        # The error's type and wording differ between torch releases (2.11: a plain RuntimeError).
        with pytest.raises(RuntimeError, match=r"two (different )?devices|at least two devices"):
            torch.nn.functional.grid_sample(images, torch.zeros(2, 16, 16, 2), align_corners=True)


def test_images_on_another_device_than_the_model_get_a_clear_error(fake_cuda_model):
    with pytest.raises(AnovlError, match=r"images are on cpu but the model is on cuda:0; move them"):
        fake_cuda_model(torch.randn(1, 3, 64, 64), ["bottle"])
