"""``anovl app``: a browser demo (Gradio). Upload an image, pick or type a class, see the heatmap overlay, the
image score and the predicted mask (downloadable as a PNG).

    anovl app                                   # the demo model: small CLIP, random weights, no download
    anovl app --config configs/mvtec.yaml --weights ViT-B-16-plus-240.pt
    anovl app --exported exports/mvtec.onnx     # an `anovl export` file (its classes only)

The server listens on 127.0.0.1 unless --host says otherwise. Bad uploads (not an image, too large, no
class) get a message in the page; the server keeps serving.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from anovl.data.image_io import BadImageError, load_rgb
from anovl.deploy.export_cli import MODEL_OVERRIDE_PREFIX, model_from_config, parse_model_overrides
from anovl.deploy.inferencer import ExportedModel, predict
from anovl.errors import AnovlError
from anovl.io import html_text, replace_together
from anovl.io.safe_names import safe_component
from anovl.models.base import AnomalyModel
from anovl.results import RANDOM_WEIGHTS_WARNING
from anovl.thresholds import check_threshold
from anovl.visualization import overlay

# The demo model of configs/demo.yaml, embedded so that the app runs from an installed package too.
DEMO_MODEL = {
    "model": {"init_args": {"backbone": "anovl-small-vit", "pretrained": None, "image_size": 224, "num_views": 22}}
}
DEMO_CLASSES = ("fabric", "widget")
# Without a recorded threshold, as a fraction of the model's map range: for probabilities (range 1), the
# abnormal state is the more probable one; for a sum over blocks, so on average.
DEFAULT_PIXEL_THRESHOLD = 0.5
MAX_UPLOAD_MB = 20
MAX_MEGAPIXELS = 40
KEEP_FILES_S = 60  # the app's mask and overlay files are deleted once this old (Gradio serves its own copies)
ORPHAN_UPLOAD_S = 600  # an upload that no request uses is deleted this long after it came


class Analyzer:
    """The app's work, independent of Gradio: checks an upload, runs the model, makes the pictures."""

    def __init__(
        self,
        model: AnomalyModel,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        max_upload_mb: float = MAX_UPLOAD_MB,
        max_megapixels: float = MAX_MEGAPIXELS,
        output_dir: str | os.PathLike | None = None,
        keep_files_s: float = KEEP_FILES_S,
    ):
        check_threshold("--image-threshold", image_threshold)
        check_threshold("--pixel-threshold", pixel_threshold)
        self.model = model
        self.image_threshold = image_threshold
        self.pixel_threshold = pixel_threshold
        self.max_upload_mb = max_upload_mb
        self.max_megapixels = max_megapixels
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="anovl-app-"))
        settings = model.settings() if hasattr(model, "settings") else {}
        self.random_weights = "pretrained" in settings and settings["pretrained"] is None
        self.keep_files_s = keep_files_s

    def _remove_old_outputs(self) -> None:
        """Mask and overlay files of earlier requests, once Gradio has served its own copy and they are old enough."""
        cutoff = time.time() - self.keep_files_s
        for old in [*self.output_dir.glob("*_mask_*.png"), *self.output_dir.glob("*_overlay_*.png")]:
            with contextlib.suppress(OSError):  # another request's sweep got there first
                if old.lstat().st_mtime < cutoff:
                    old.unlink()

    @property
    def fixed_classes(self) -> list[str] | None:
        """The only classes the model knows (an exported model), or None when any class name works."""
        return self.model.classes if isinstance(self.model, ExportedModel) else None

    def thresholds(self, category: str) -> tuple[float | None, float | None]:
        image, pixel = self.model.thresholds(category) if isinstance(self.model, ExportedModel) else (None, None)
        return (
            self.image_threshold if self.image_threshold is not None else image,
            self.pixel_threshold if self.pixel_threshold is not None else pixel,
        )

    def load(self, path: str | None) -> np.ndarray:
        if not path:
            raise AnovlError("upload an image first")
        if not os.path.isfile(path):
            raise AnovlError(
                "the upload is gone (each upload is deleted when its request ends); upload the image again"
            )
        name = Path(path).name
        size = os.path.getsize(path)
        if size == 0:
            raise AnovlError(f"{name} is empty; upload an image file (PNG, JPEG, BMP, TIFF)")
        if size > self.max_upload_mb * 2**20:
            raise AnovlError(f"{name} is {size / 2**20:.3g} MB; the demo takes images up to {self.max_upload_mb:g} MB")
        unreadable = AnovlError(f"{name} is not a readable image; upload a PNG, JPEG, BMP or TIFF file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
                with Image.open(path) as image:  # the header only: a small file may declare a huge image
                    width, height = image.size
        except Image.DecompressionBombError:
            raise AnovlError(
                f"{name} declares more pixels than Pillow's decompression-bomb limit; the demo takes "
                f"images up to {self.max_megapixels:g} megapixels"
            ) from None
        except Exception:  # noqa: BLE001 - Pillow's many errors for files that are not images
            raise unreadable from None
        if width * height > self.max_megapixels * 1e6:
            raise AnovlError(
                f"{name} has {width}×{height} pixels; the demo takes images up to {self.max_megapixels:g} megapixels"
            )
        try:
            return load_rgb(path)
        except BadImageError:  # its message names the server's temporary copy, not the user's file
            raise unreadable from None

    def __call__(self, path: str | None, category: str | None) -> dict[str, Any]:
        """``status`` (Markdown), ``score`` (text), ``overlay`` and ``mask`` (uint8 arrays), and the same two
        pictures as PNG files (``overlay_file``, ``mask_file``), each request its own."""
        category = (category or "").strip()
        if not category:
            raise AnovlError("pick or type the class of the object in the image, e.g. 'bottle'")
        if self.fixed_classes is not None and category not in self.fixed_classes:
            raise AnovlError(f"this exported model knows the classes {', '.join(self.fixed_classes)}, not {category!r}")
        self._remove_old_outputs()
        rgb = self.load(path)
        assert path is not None, "load() refuses a missing upload"
        image_threshold, pixel_threshold = self.thresholds(category)
        map_range = self.model.map_range
        notes = [f"heatmap on the fixed scale 0-{map_range:g} (blue 0, red {map_range:g})"]
        if pixel_threshold is None:
            pixel_threshold = DEFAULT_PIXEL_THRESHOLD * map_range
            notes.append(f"no pixel threshold was given: the mask marks map values at or above {pixel_threshold:g}")
        result = predict(self.model, rgb, category, image_threshold, pixel_threshold)
        verdict = "" if result.pred_label is None else (" (anomalous)" if result.pred_label else " (normal)")
        assert result.pred_mask is not None, "a pixel threshold is always given"
        mask = result.pred_mask.astype(np.uint8) * 255
        heatmap = overlay(result.image, result.anomaly_map, map_range=map_range)
        # The class comes from the page: the file name must not let it choose a folder; the token keeps
        # concurrent requests (the same image and class, say) from sharing a file.
        stem, token = safe_component(f"{Path(path).stem}_{category}")[:110], secrets.token_hex(6)
        mask_path = self.output_dir / f"{stem}_mask_{token}.png"
        overlay_path = self.output_dir / f"{stem}_overlay_{token}.png"
        replace_together(
            {mask_path: Image.fromarray(mask).save, overlay_path: Image.fromarray(heatmap).save}, self.output_dir
        )
        status = (
            f"**{html_text(category)}**: image score {result.pred_score:.4f}{verdict}, "
            f"{int(result.pred_mask.sum())} of {mask.size} pixels at or above {pixel_threshold:g}."
        )
        if self.random_weights:
            notes.append(f"**{RANDOM_WEIGHTS_WARNING}**")
        return {
            "status": "  \n".join([status, *notes]),
            "score": f"{result.pred_score:.4f}{verdict}",
            "overlay": heatmap,
            "mask": mask,
            "overlay_file": str(overlay_path),
            "mask_file": str(mask_path),
        }


class UploadJanitor:
    """Deletes each upload when the last request that uses it ends, accepted or refused.

    Gradio stores identical uploads (same bytes, same name) under one content-hashed path, so two strangers
    uploading the same image at once get one file: deleting it when the first request ends would fail the
    second, still queued. So every upload is counted when Gradio answers it (:class:`UploadCounter`, before
    the client can submit a request), and each request's end takes one count off; the file (and its hash
    folder, once empty) goes at zero. An upload no request ever uses is deleted ``orphan_s`` after it came.
    """

    def __init__(self, orphan_s: float = ORPHAN_UPLOAD_S):
        self.orphan_s = orphan_s
        self.pending: dict[str, tuple[int, float]] = {}  # path -> (uploads not yet used, time of the last)
        self.lock = threading.Lock()

    def uploaded(self, path: str) -> None:
        with self.lock:
            count, _ = self.pending.get(path, (0, 0.0))
            self.pending[path] = (count + 1, time.monotonic())
        self.sweep()

    def used(self, path: str | None) -> None:
        """A request with ``path`` ended (an upload the counter did not see goes at once)."""
        if path:
            with self.lock:
                count, last = self.pending.pop(path, (1, 0.0))
                if count > 1:
                    self.pending[path] = (count - 1, last)
            if count <= 1:
                _delete_upload(path)
        self.sweep()

    def sweep(self) -> None:
        now = time.monotonic()
        with self.lock:
            old = [path for path, (_, last) in self.pending.items() if now - last >= self.orphan_s]
            for path in old:
                del self.pending[path]
        for path in old:
            _delete_upload(path)


def _delete_upload(path: str) -> None:
    with contextlib.suppress(OSError):  # gone already (a second request of the same upload), or not ours
        Path(path).unlink(missing_ok=True)
        Path(path).parent.rmdir()  # the hash folder, unless another name of the same bytes is in it


class UploadCounter:
    """ASGI middleware: tells the janitor of every file path in a successful answer of Gradio's ``/upload``."""

    def __init__(self, app: Any, uploads: UploadJanitor):
        self.app = app
        self.uploads = uploads

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/upload"):
            return await self.app(scope, receive, send)
        status = 0
        body = bytearray()

        async def counting_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if status == 200 and not message.get("more_body"):  # counted before the client has the paths
                    with contextlib.suppress(ValueError):
                        for path in json.loads(body):
                            if isinstance(path, str):
                                self.uploads.uploaded(path)
            await send(message)

        await self.app(scope, receive, counting_send)


def build_app(analyzer: Analyzer, classes: Sequence[str] = (), orphan_upload_s: float = ORPHAN_UPLOAD_S):
    """The Gradio page around ``analyzer`` (``classes`` are offered in the class box; any may be typed
    unless the model is an export). Its ``launch`` counts uploads for the :class:`UploadJanitor`."""
    import gradio as gr
    from starlette.middleware import Middleware

    uploads = UploadJanitor(orphan_upload_s)

    class Demo(gr.Blocks):
        def launch(self, *args: Any, app_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
            app_kwargs = dict(app_kwargs or {})
            app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(UploadCounter, uploads=uploads)]
            return super().launch(*args, app_kwargs=app_kwargs, **kwargs)

    fixed = analyzer.fixed_classes
    choices = list(fixed if fixed is not None else classes)
    with Demo(title="anovl: zero-shot anomaly localisation", analytics_enabled=False) as demo:
        gr.Markdown(
            "## anovl: zero-shot anomaly localisation\nUpload an image, pick or type its class, press "
            "**Detect anomalies**."
        )
        if analyzer.random_weights:
            gr.Markdown(f"**{RANDOM_WEIGHTS_WARNING}**", elem_id="random-weights")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Image (PNG, JPEG, BMP, TIFF)", type="filepath", elem_id="upload")
                category = gr.Dropdown(
                    choices=choices,
                    value=None,
                    label="Class (pick or type)",
                    allow_custom_value=fixed is None,
                    elem_id="category",
                )
                run = gr.Button("Detect anomalies", variant="primary", elem_id="run")
                status = gr.Markdown(elem_id="status")
                score = gr.Textbox(label="Image score", interactive=False, elem_id="score")
            with gr.Column():
                overlay_view = gr.Image(
                    label="Heatmap overlay", format="png", interactive=False, height=320, elem_id="overlay"
                )
                mask_view = gr.Image(
                    label="Predicted mask", format="png", interactive=False, height=320, elem_id="mask"
                )
                mask_file = gr.File(label="Mask (PNG)", interactive=False, elem_id="mask-file")

        def analyze(path: str | None, name: str | None):
            try:
                result = analyzer(path, name)
            except AnovlError as error:
                return f"**Error:** {html_text(error)}", "", None, None, None  # names from the page, escaped
            finally:
                uploads.used(path)
            # Pictures as our files, not arrays: Gradio rewrites an array's content-hashed cache file in place
            # when another request gives identical pixels, cutting short a download of it in progress ("peer
            # closed connection"); a file is copied into its cache atomically and reused.
            return result["status"], result["score"], result["overlay_file"], result["mask_file"], result["mask_file"]

        run.click(analyze, [upload, category], [status, score, overlay_view, mask_view, mask_file])
    return demo


def load_app_model(args: argparse.Namespace, overrides: dict[str, Any]) -> AnomalyModel:
    if args.exported:
        if args.config or args.weights or overrides:
            raise AnovlError(
                "--exported runs the exported file as it is; leave out --config, --weights and "
                f"{MODEL_OVERRIDE_PREFIX}*"
            )
        return ExportedModel(args.exported, args.backend)
    if args.weights:
        overrides = {**overrides, "pretrained": args.weights}
    return model_from_config(args.config or ({"model": {}} if args.weights else DEMO_MODEL), overrides)


def app_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anovl app",
        description="Browser demo: upload an image, see its anomaly map, score and mask.",
        epilog="Without --config, --weights or --exported it runs the demo model (random weights, no download).",
    )
    parser.add_argument("--config", help="an anovl config whose model: section is AnoVL")
    parser.add_argument(
        "--weights",
        help="a local CLIP weights file (model.init_args.pretrained); without "
        "--config the backbone is AnoVL's default, ViT-B-16-plus-240",
    )
    parser.add_argument("--exported", help="an `anovl export` file (.onnx, .xml, .pt) with its sidecar")
    parser.add_argument("--backend", choices=["onnxruntime", "openvino", "torch"], help="for --exported")
    parser.add_argument("--classes", nargs="+", default=None, help="classes offered in the class box")
    parser.add_argument("--image-threshold", type=float, help="image-score threshold (else the export's)")
    parser.add_argument(
        "--pixel-threshold",
        type=float,
        help=f"pixel threshold of the mask (else the export's, else {DEFAULT_PIXEL_THRESHOLD:g} of the map range: "
        f"{DEFAULT_PIXEL_THRESHOLD:g} for AnoVL)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB)
    parser.add_argument("--max-megapixels", type=float, default=MAX_MEGAPIXELS)
    return parser


def main(argv: Sequence[str]) -> None:
    """``anovl app``: see :func:`app_parser`."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise AnovlError("the app needs Gradio: pip install 'anovl[app]'") from None
    args, extra = app_parser().parse_known_args(list(argv))
    model = load_app_model(args, parse_model_overrides(extra))
    classes = args.classes or ([] if args.config or args.weights else list(DEMO_CLASSES))
    analyzer = Analyzer(model, args.image_threshold, args.pixel_threshold, args.max_upload_mb, args.max_megapixels)
    build_app(analyzer, classes).launch(
        server_name=args.host, server_port=args.port, max_file_size=f"{4 * args.max_upload_mb:g}mb"
    )
