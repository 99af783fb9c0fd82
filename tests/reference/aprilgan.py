"""Reference outputs of APRIL-GAN's own scripts (ByChelsea/VAND-APRIL-GAN) for tests/test_aprilgan_parity.py.

Runs the authors' unmodified ``train.py`` (one Adam step on one batch) and ``test.py`` (zero-shot and few-shot)
on a tiny random CLIP and a tiny VisA-layout dataset, and stores what anovl must reproduce in an npz:

    python tests/reference/aprilgan.py --repo /path/to/VAND-APRIL-GAN --out tests/reference/data/aprilgan.npz

Run it OUTSIDE the project's import path (the authors' repository brings its own ``open_clip`` package);
nothing of the authors' code is copied here. What this script adds around their scripts:

* the CLIP's weights: overwritten right after the authors' factory builds it by :func:`parity_weights`, a
  seeded procedure over the parameter names that the test applies to anovl's CLIP as well;
* observation: their functions are wrapped to record what they compute (the CLIP built, the initial linear
  heads, each loss term, the maps handed to ``normalize`` for the pictures, the image scores handed to
  ``roc_auc_score``);
* portability to a CPU-only machine with today's packages: their encoder moves a debug tensor to 'cuda'
  (mapped to the CPU here), their training step relies on CUDA autocast's copies around an in-place
  division (done out of place here, in float32), and ``pkg_resources``, ``skimage.measure`` and ``tabulate`` are imported by their
  scripts only for unused names, AUPRO and printing (small stand-ins here).

The reference numbers do not depend on those stand-ins: the maps and scores are recorded before the metrics.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import runpy
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

MODEL_NAME = "ViT-parity"  # the authors' LinearLayer takes patch tokens when 'ViT' is in the name
CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 48, "layers": 12, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
IMAGE_SIZE = 48  # 6×6 patches
LAYERS = [3, 6, 9, 12]
FEW_SHOT_LAYERS = [4, 8, 12]
K_SHOT = 2
WEIGHT_SEED = 7
CLASSES = ["bottle", "screw"]
# Per class: test images (anomalous or not) and normal train images (the few-shot pool).
TEST_IMAGES = [("good", 0), ("crack", 1), ("hole", 1)]
TRAIN_IMAGES = 3


def parity_weights(model: torch.nn.Module, seed: int = WEIGHT_SEED) -> None:
    """Overwrite every parameter of a CLIP, in name order, from one seeded generator: norms' weights near 1,
    matrices scaled by their input width, everything else small."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            if parameter.ndim >= 2:
                value = noise / parameter.shape[-1] ** 0.5
            elif "ln" in name and name.endswith("weight"):
                value = 1 + 0.1 * noise
            else:
                value = 0.1 * noise
            parameter.copy_(value)


def write_dataset(root: Path) -> dict[str, list]:
    """A VisA-layout dataset (meta.json as the authors' VisaDataset reads it) of noise images with masks."""
    from PIL import Image

    rng = np.random.default_rng(0)
    meta: dict[str, dict[str, list]] = {"test": {}, "train": {}}
    for name in CLASSES:
        meta["test"][name], meta["train"][name] = [], []
        for index, (specie, anomaly) in enumerate(TEST_IMAGES):
            image_path = f"{name}/test/{specie}/{index:03d}.png"
            (root / image_path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(root / image_path)
            mask_path = ""
            if anomaly:
                mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
                top, left = rng.integers(0, IMAGE_SIZE - 16, 2)
                mask[top : top + 12 + index * 2, left : left + 10] = 255
                mask_path = f"{name}/ground_truth/{specie}/{index:03d}_mask.png"
                (root / mask_path).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / mask_path)
            meta["test"][name].append(
                {
                    "img_path": image_path,
                    "mask_path": mask_path,
                    "cls_name": name,
                    "specie_name": specie,
                    "anomaly": anomaly,
                }
            )
        for index in range(TRAIN_IMAGES):
            image_path = f"{name}/train/good/{index:03d}.png"
            (root / image_path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(root / image_path)
            meta["train"][name].append(
                {"img_path": image_path, "mask_path": "", "cls_name": name, "specie_name": "good", "anomaly": 0}
            )
    (root / "meta.json").write_text(json.dumps(meta))
    return meta


def install_stand_ins() -> None:
    """Modules the authors' scripts import for what the reference does not use (see the module docstring)."""
    from scipy import ndimage

    class Region:
        def __init__(self, coords: np.ndarray):
            self.coords, self.area = coords, len(coords)

    measure = types.ModuleType("skimage.measure")
    measure.label = lambda mask: ndimage.label(mask)[0]
    measure.regionprops = lambda labels: [Region(np.argwhere(labels == value)) for value in range(1, labels.max() + 1)]
    skimage = types.ModuleType("skimage")
    skimage.measure = measure
    pkg_resources = types.ModuleType("pkg_resources")
    pkg_resources.packaging = None
    tabulate = types.ModuleType("tabulate")
    tabulate.tabulate = lambda *args, **kwargs: ""
    for module in (measure, skimage, pkg_resources, tabulate):
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    sys.modules.update(
        {"skimage": skimage, "skimage.measure": measure, "pkg_resources": pkg_resources, "tabulate": tabulate}
    )
    to = torch.Tensor.to

    def to_cpu_for_cuda(self, *args, **kwargs):
        if args and args[0] == "cuda" and not torch.cuda.is_available():
            args = ("cpu", *args[1:])
        return to(self, *args, **kwargs)

    torch.Tensor.to = to_cpu_for_cuda
    # train.py divides the heads' outputs by their norms in place; under CUDA autocast the norm keeps its own
    # float32 copy, so autograd sees x / |x|. Without autocast the in-place op breaks backward: the same
    # division, out of place, for tensors that need gradients.
    divide_in_place = torch.Tensor.__itruediv__

    def divide(self, other):
        return self / other if self.requires_grad else divide_in_place(self, other)

    torch.Tensor.__itruediv__ = divide


def run_script(repo: Path, script: str, argv: list[str]) -> None:
    sys.argv = [script, *argv]
    runpy.run_path(str(repo / script), run_name="__main__")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", required=True, type=Path, help="a checkout of ByChelsea/VAND-APRIL-GAN")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    repo = args.repo.resolve()
    sys.path.insert(0, str(repo))
    install_stand_ins()
    import loss as authors_loss  # the authors' modules, patched below to record what they compute
    import model as authors_model
    import open_clip

    work = Path(tempfile.mkdtemp(prefix="aprilgan-ref-"))
    data_root = work / "visa"
    write_dataset(data_root)
    config_path = work / f"{MODEL_NAME}.json"
    config_path.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(str(config_path))

    record: dict[str, list] = {"clip": [], "heads": [], "focal": [], "dice": [], "roc": [], "gradients": []}
    create = open_clip.create_model_and_transforms

    def create_with_parity_weights(*call_args, **call_kwargs):
        built = create(*call_args, **call_kwargs)
        parity_weights(built[0])
        record["clip"].append(built[0])
        return built

    open_clip.create_model_and_transforms = create_with_parity_weights

    # Patched methods, not subclasses: the authors' classes call super() by their module-level names.
    linear_init = authors_model.LinearLayer.__init__

    def recorded_linear_init(self, *layer_args, **layer_kwargs):
        linear_init(self, *layer_args, **layer_kwargs)
        record["heads"].append({key: value.clone() for key, value in self.state_dict().items()})

    def recorded_forward(forward, name):
        def recorded(self, *loss_args):
            value = forward(self, *loss_args)
            record[name].append(value.item())
            return value

        return recorded

    adam_step = torch.optim.Adam.step

    def recorded_step(self, *step_args, **step_kwargs):
        # Adam's first step moves every weight by about lr·sign(gradient): the gradients say more.
        record["gradients"].append(
            [parameter.grad.clone() for group in self.param_groups for parameter in group["params"]]
        )
        return adam_step(self, *step_args, **step_kwargs)

    authors_model.LinearLayer.__init__ = recorded_linear_init
    torch.optim.Adam.step = recorded_step
    authors_loss.FocalLoss.forward = recorded_forward(authors_loss.FocalLoss.forward, "focal")
    authors_loss.BinaryDiceLoss.forward = recorded_forward(authors_loss.BinaryDiceLoss.forward, "dice")
    common = [
        "--config_path",
        str(config_path),
        "--model",
        MODEL_NAME,
        "--pretrained",
        "",
        "--image_size",
        str(IMAGE_SIZE),
        "--features_list",
        *map(str, LAYERS),
    ]
    batch = len(CLASSES) * len(TEST_IMAGES)
    run_script(
        repo,
        "train.py",
        [
            "--dataset",
            "visa",
            "--train_data_path",
            str(data_root),
            "--save_path",
            str(work / "train"),
            "--epoch",
            "1",
            "--batch_size",
            str(batch),
            "--print_freq",
            "1",
            "--save_freq",
            "1",
            *common,
        ],
    )
    trained = torch.load(work / "train" / "epoch_1.pth", weights_only=True)["trainable_linearlayer"]
    initial = record["heads"][0]
    # Inference with given heads: the initial ones, saved in the authors' release format.
    given = work / "given.pth"
    torch.save({"trainable_linearlayer": initial}, given)

    import sklearn.metrics

    roc = sklearn.metrics.roc_auc_score

    def recorded_roc(truth, scores, *roc_args, **roc_kwargs):
        record["roc"].append(np.asarray(scores, dtype=np.float64).copy())
        return roc(truth, scores, *roc_args, **roc_kwargs)

    # test.py imports roc_auc_score when it runs: per class it is called with the class's pixel maps
    # (flattened, in test order) and then with its image scores, after the few-shot mixing.
    sklearn.metrics.roc_auc_score = recorded_roc
    outputs: dict[str, np.ndarray] = {}
    images_per_class = len(TEST_IMAGES)
    for mode in ("zero_shot", "few_shot"):
        record["roc"].clear()
        save_path = work / mode
        run_script(
            repo,
            "test.py",
            [
                "--data_path",
                str(data_root),
                "--save_path",
                str(save_path),
                "--checkpoint_path",
                str(given),
                "--dataset",
                "visa",
                "--mode",
                mode,
                "--k_shot",
                str(K_SHOT),
                "--few_shot_features",
                *map(str, FEW_SHOT_LAYERS),
                *common,
            ],
        )
        outputs[f"{mode}_maps"] = np.concatenate(
            [pixels.reshape(images_per_class, IMAGE_SIZE, IMAGE_SIZE) for pixels in record["roc"][0::2]]
        ).astype(np.float32)
        outputs[f"{mode}_scores"] = np.concatenate(record["roc"][1::2])
        if mode == "few_shot":
            outputs["few_shot_images"] = np.array((save_path / "k_shot.txt").read_text().split())
    clip = record["clip"][0]
    first_step_loss = sum(record["focal"][: len(LAYERS)]) + sum(record["dice"][: len(LAYERS)])
    np.savez_compressed(
        args.out,
        initial_weight=np.stack([initial[f"fc.{i}.weight"].numpy() for i in range(len(LAYERS))]),
        initial_bias=np.stack([initial[f"fc.{i}.bias"].numpy() for i in range(len(LAYERS))]),
        trained_weight=np.stack([trained[f"fc.{i}.weight"].numpy() for i in range(len(LAYERS))]),
        trained_bias=np.stack([trained[f"fc.{i}.bias"].numpy() for i in range(len(LAYERS))]),
        # LinearLayer's parameters in order: fc.0.weight, fc.0.bias, fc.1.weight, ...
        gradient_weight=np.stack([gradient.numpy() for gradient in record["gradients"][0][0::2]]),
        gradient_bias=np.stack([gradient.numpy() for gradient in record["gradients"][0][1::2]]),
        focal=np.array(record["focal"][: len(LAYERS)]),
        dice=np.array(record["dice"][: len(LAYERS)]),
        loss=np.array(first_step_loss),
        parameter_names=np.array(sorted(name for name, _ in clip.named_parameters())),
        **outputs,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
