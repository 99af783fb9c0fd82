"""The subcommands of the ``anovl`` console script and their one-line descriptions, shared by the light dispatcher
(:mod:`anovl.cli`) and the LightningCLI of ``test`` / ``predict`` (:mod:`anovl.lightning_cli`) without either
importing the other."""

# Listed by `anovl --help`, in this order.
COMMANDS = {
    "fit": "train a method's heads or prompts on labelled images with masks (auxiliary data)",
    "test": "run a method on a labelled dataset: per-category metrics, results files, pictures",
    "predict": "anomaly maps and scores for images (labels not needed)",
    "compare": "put finished runs side by side, category by category",
    "grid": "run variants x datasets from one YAML and write one comparison table",
    "protocol": "train on one dataset, test on another (cross-dataset zero-shot protocol), one table",
    "export": "export a model to ONNX, OpenVINO IR or TorchScript for deployment",
    "app": "a browser demo: upload an image, see its anomaly map",
}
DESCRIPTION = "Zero-shot anomaly localisation with vision-language models."
