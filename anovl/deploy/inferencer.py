"""Running an exported model: :class:`ExportedModel`, an :class:`~anovl.models.base.AnomalyModel` backed by
ONNX Runtime, OpenVINO or TorchScript, and :func:`predict` for one image of any model.

    from anovl.deploy import load_exported
    model = load_exported("exports/demo.onnx")        # reads exports/demo.onnx.json too
    result = model.predict("photo.png", "bottle")     # resize + normalise as the sidecar says, then run
    result.pred_score, result.anomaly_map, result.pred_mask

Under the framework, ``ExportedModel`` is a model like AnoVL (``anovl predict --exported FILE``): the
categories of a batch are mapped to the exported class indices.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from anovl.data.image_io import load_rgb
from anovl.data.transforms import CLIP_MEAN, CLIP_STD, normalize, resize_image
from anovl.deploy.sidecar import FORMATS, INPUT_NAMES, Sidecar, sidecar_path
from anovl.errors import AnovlError
from anovl.models.base import AnomalyModel, ModelOutput, Preprocessing, check_image_batch

BACKENDS = ("onnxruntime", "openvino", "torch")
DEFAULT_BACKEND = {".onnx": "onnxruntime", ".xml": "openvino", ".pt": "torch"}
# OpenVINO may run in bf16 on CPUs that have it; f32 keeps the exported maps equal to PyTorch's.
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}

Runner = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _onnxruntime_runner(path: Path, threads: int | None) -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(images: np.ndarray, class_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = session.run(None, dict(zip(INPUT_NAMES, (images, class_index))))
        return maps, scores

    return run


def _openvino_runner(path: Path, threads: int | None) -> Runner:
    import openvino

    config = {**OPENVINO_CONFIG, **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    compiled = openvino.Core().compile_model(str(path), "CPU", config)

    def run(images: np.ndarray, class_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        results = compiled(dict(zip(INPUT_NAMES, (images, class_index))))
        return results[compiled.outputs[0]], results[compiled.outputs[1]]

    return run


@dataclass
class Prediction:
    """One image's result at the model's resolution S×S."""

    image: np.ndarray  # uint8 S×S×3, the resized input
    anomaly_map: np.ndarray  # float32 S×S
    pred_score: float
    image_threshold: float | None
    pixel_threshold: float | None

    @property
    def pred_label(self) -> bool | None:
        """Anomalous (score above the image threshold); None without a threshold."""
        return None if self.image_threshold is None else self.pred_score >= self.image_threshold

    @property
    def pred_mask(self) -> np.ndarray | None:
        """bool S×S: pixels above the pixel threshold; None without a threshold."""
        return None if self.pixel_threshold is None else self.anomaly_map >= self.pixel_threshold


def _as_rgb(image: str | os.PathLike | Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        return load_rgb(Path(image))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise AnovlError(
            f"give an image as a path, a PIL image or a uint8 H×W×3 RGB array, not an array of "
            f"{array.dtype} {array.shape}"
        )
    if 0 in array.shape[:2]:
        raise AnovlError(f"the image is {array.shape[1]}×{array.shape[0]} pixels; give an image with pixels")
    return array


def prepare(
    image: str | os.PathLike | Image.Image | np.ndarray, preprocessing: Preprocessing
) -> tuple[np.ndarray, torch.Tensor]:
    """The resized uint8 image and the model input (1×3×S×S) of one image, as ``preprocessing`` says."""
    if (preprocessing.interpolation, tuple(preprocessing.mean), tuple(preprocessing.std)) != (
        "bilinear",
        CLIP_MEAN,
        CLIP_STD,
    ):
        raise AnovlError(
            f"unsupported preprocessing {preprocessing}; anovl models take bilinear resizing and CLIP's normalisation"
        )
    size = preprocessing.image_size
    resized = resize_image(_as_rgb(image), (size, size))
    return resized, normalize(resized).unsqueeze(0)


def model_preprocessing(model: AnomalyModel) -> Preprocessing:
    method = getattr(model, "preprocessing", None)
    return method() if callable(method) else Preprocessing(model.image_size)


@torch.no_grad()
def predict(
    model: AnomalyModel,
    image: str | os.PathLike | Image.Image | np.ndarray,
    category: str,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
) -> Prediction:
    """Run any anomaly model (AnoVL, an :class:`ExportedModel`, ...) on one image of ``category``."""
    if not isinstance(category, str) or not category.strip():
        raise AnovlError("give the class (category) of the image, e.g. 'bottle'")
    resized, tensor = prepare(image, model_preprocessing(model))
    output = model(tensor.to(model.device), [category.strip()])
    return Prediction(
        resized,
        output.anomaly_map[0].float().cpu().numpy(),
        float(output.pred_score[0]),
        image_threshold,
        pixel_threshold,
    )


class ExportedModel(AnomalyModel):
    """An exported AnoVL (see :mod:`anovl.deploy.export`) as a model of the framework.

    Args:
        path: the exported file (``.onnx``, ``.xml`` or ``.pt``); its sidecar ``<path>.json`` must be beside it.
        backend: ``onnxruntime``, ``openvino`` (runs ``.xml`` and ``.onnx``) or ``torch`` (``.pt``); default by suffix.
        threads: CPU threads of ONNX Runtime / OpenVINO (default: theirs, all cores); torch uses its global setting.
    """

    method = "AnoVL"

    def __init__(self, path: str | os.PathLike, backend: str | None = None, threads: int | None = None):
        super().__init__()
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise AnovlError(f"exported model not found: {self.path}")
        if self.path.suffix not in DEFAULT_BACKEND:
            raise AnovlError(
                f"{self.path.name} is not an exported model; give a "
                f"{', '.join(FORMATS.values())} file written by `anovl export`"
            )
        self.sidecar = Sidecar.read(sidecar_path(self.path))
        self.backend = backend or DEFAULT_BACKEND[self.path.suffix]
        if self.backend not in BACKENDS:
            raise AnovlError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        readable = {"onnxruntime": {".onnx"}, "openvino": {".onnx", ".xml"}, "torch": {".pt"}}[self.backend]
        if self.path.suffix not in readable:
            raise AnovlError(
                f"the {self.backend} backend cannot run {self.path.name}; it runs {', '.join(sorted(readable))}"
            )
        self.image_size = self.sidecar.image_size
        self.class_index = {entry.category: index for index, entry in enumerate(self.sidecar.classes)}
        self.scripted: torch.jit.ScriptModule | None = None
        self._runner: Runner | None = None
        try:
            if self.backend == "torch":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation: the format is asked for
                    # A TorchScript file is code, like a pickle (docs/SECURITY.md): only load files you would run.
                    self.scripted = torch.jit.load(str(self.path), map_location="cpu")
            else:
                self._runner = (_onnxruntime_runner if self.backend == "onnxruntime" else _openvino_runner)(
                    self.path, threads
                )
        except ImportError as error:
            raise AnovlError(
                f"the {self.backend} backend is not installed ({error}); pip install 'anovl[deploy]'"
            ) from None
        except Exception as error:  # each runtime has its own error types for unreadable files
            raise AnovlError(
                f"cannot load {self.path} with {self.backend} ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[0] if str(error).strip() else 'no details'}); "
                "export the model again"
            ) from None
        self._check_graph()

    def _check_graph(self) -> None:
        """Run the graph once on a blank image of the sidecar's size with its last class: a sidecar that does not
        fit its graph (another size, more classes than the graph holds, other outputs) is refused here."""
        size = self.image_size
        try:
            self._run(torch.zeros(1, 3, size, size), torch.tensor([len(self.class_index) - 1]))
        except AnovlError as error:
            raise AnovlError(
                f"the sidecar {sidecar_path(self.path)} does not fit the graph {self.path.name}: "
                f"{error}; export the model again"
            ) from None
        except Exception as error:  # noqa: BLE001 - the runtimes' own error types for a graph that cannot run
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise AnovlError(
                f"the sidecar {sidecar_path(self.path)} does not fit the graph {self.path.name} "
                f"({type(error).__name__}: {first}); export the model again"
            ) from None

    @property
    def classes(self) -> list[str]:
        return list(self.class_index)

    @property
    def label(self) -> str:
        return self.sidecar.label

    @property
    def variant(self) -> str:
        return "tfa"

    @property
    def map_range(self) -> float:
        return self.sidecar.map_range

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            self.sidecar.image_size, tuple(self.sidecar.mean), tuple(self.sidecar.std), self.sidecar.interpolation
        )

    def settings(self) -> dict[str, Any]:
        return self.sidecar.settings

    def thresholds(self, category: str) -> tuple[float | None, float | None]:
        """(image, pixel) thresholds recorded for ``category``."""
        entry = self.sidecar.classes[self.indices([category])[0]]
        return entry.image_threshold, entry.pixel_threshold

    def indices(self, categories: Sequence[str], prompt_names: Sequence[str] | None = None) -> list[int]:
        """The exported class index of each category; a clear error for one that was not exported."""
        if isinstance(categories, str):
            raise AnovlError(f"give a list of categories, one per image, not the string {categories!r}")
        indices = []
        for position, category in enumerate(categories):
            if category not in self.class_index:
                raise AnovlError(
                    f"class {category!r} was not exported in {self.path.name}; it has "
                    f"{', '.join(self.class_index)} (export again with --classes ... {category})"
                )
            index = self.class_index[category]
            expected = self.sidecar.classes[index].prompt_name
            if prompt_names is not None and prompt_names[position] != expected:
                raise AnovlError(
                    f"class {category!r} was exported with the prompt name {expected!r}, not "
                    f"{prompt_names[position]!r}; export it again with --classes '{category}="
                    f"{prompt_names[position]}'"
                )
            indices.append(index)
        return indices

    def forward(
        self, images: torch.Tensor, categories: Sequence[str], prompt_names: Sequence[str] | None = None, **extras: Any
    ) -> ModelOutput:
        check_image_batch(images)  # what AnoVL refuses too (uint8 pixels, an empty batch)
        size = self.image_size
        if tuple(images.shape[1:]) != (3, size, size):
            raise AnovlError(f"images must be a B×3×{size}×{size} tensor, got {tuple(images.shape)}")
        if len(categories) != images.shape[0]:
            raise AnovlError(f"give one category per image ({images.shape[0]}), got {len(categories)}")
        class_index = torch.tensor(self.indices(categories, prompt_names), dtype=torch.int64)
        return self._run(images, class_index)

    def _run(self, images: torch.Tensor, class_index: torch.Tensor) -> ModelOutput:
        if self.scripted is not None:
            with torch.no_grad():
                maps, scores = self.scripted(images.float(), class_index.to(images.device))
        else:
            assert self._runner is not None, "__init__ sets a runner where there is no TorchScript module"
            maps, scores = (
                torch.from_numpy(np.asarray(output)).to(images.device)
                for output in self._runner(images.detach().float().cpu().contiguous().numpy(), class_index.numpy())
            )
        batch, size = images.shape[0], self.image_size
        if tuple(maps.shape) != (batch, size, size) or tuple(scores.shape) != (batch,):
            raise AnovlError(
                f"the exported graph gave outputs of shapes {tuple(maps.shape)} and {tuple(scores.shape)}, "
                f"not ({batch}, {size}, {size}) and ({batch},)"
            )
        return ModelOutput(maps, scores)

    def predict(self, image: str | os.PathLike | Image.Image | np.ndarray, category: str) -> Prediction:
        """One image (path, PIL image or uint8 RGB array) of ``category``, with the recorded thresholds."""
        image_threshold, pixel_threshold = self.thresholds(category)
        return predict(self, image, category, image_threshold, pixel_threshold)


def load_exported(path: str | os.PathLike, backend: str | None = None, threads: int | None = None) -> ExportedModel:
    """Load an exported model and its sidecar (see :class:`ExportedModel`)."""
    return ExportedModel(path, backend, threads)
