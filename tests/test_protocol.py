"""`anovl protocol`: train on one generated dataset, test on the other, both ways, one table (end to end)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from anovl.data.synthetic import generate_mvtec_like, generate_visa_like
from anovl.errors import AnovlError
from anovl.protocol import load_protocol

REPO = Path(__file__).resolve().parent.parent
TINY = {"backbone": "anovl-tiny-vit", "pretrained": None, "image_size": 64}
QUIET = {"trainer": {"enable_progress_bar": False, "enable_model_summary": False}}


def protocol_file(folder: Path, mvtec: Path, visa: Path) -> Path:
    data = {"batch_size": 4}
    document = {
        "name": "tiny",
        "datasets": {
            "MVTec": [
                {"data": {"class_path": "anovl.data.MVTecDataModule", "init_args": {"root": str(mvtec), **data}}}
            ],
            "VisA": [
                {
                    "data": {
                        "class_path": "anovl.data.VisADataModule",
                        "init_args": {"root": str(visa), "mode": "resize", **data},
                    }
                }
            ],
        },
        "pairs": [["MVTec", "VisA"], ["VisA", "MVTec"]],
        "methods": {
            "AnoVL": {
                "configs": [{"model": {"class_path": "anovl.models.AnoVL", "init_args": {**TINY, "num_views": 2}}}]
            },
            "WinCLIP": {"configs": [{"model": {"class_path": "anovl.models.WinCLIP", "init_args": TINY}}]},
            "APRIL-GAN": {
                "configs": [
                    {"model": {"class_path": "anovl.models.AprilGAN", "init_args": {**TINY, "layers": [1, 2, 3]}}}
                ],
                "fit": {
                    "MVTec": [{"engine": {"mosaic_rate": 0.2}, "trainer": {"max_epochs": 2}}],
                    "VisA": [{"trainer": {"max_epochs": 1}}],
                },
            },
            "AnomalyCLIP": {
                "configs": [
                    {
                        "model": {
                            "class_path": "anomalyclip",
                            "init_args": {
                                **TINY,
                                "layers": [1, 2, 3],
                                "dpam_blocks": 2,
                                "n_ctx": 4,
                                "depth": 2,
                                "t_n_ctx": 2,
                            },
                        }
                    }
                ],
                "fit": {"MVTec": [{"trainer": {"max_epochs": 1}}], "VisA": [{"trainer": {"max_epochs": 1}}]},
            },
        },
        "metrics": ["pixel_auroc", "image_auroc"],
        "args": ["--config", yaml.safe_dump(QUIET)],
    }
    path = folder / "protocol.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.slow  # thirteen fit/test processes: about 6 minutes on 2 cores
def test_protocol_trains_on_one_dataset_and_tests_on_the_other(tmp_path):
    mvtec = generate_mvtec_like(tmp_path / "mvtec", ("widget",), n_good=2, n_defect=1, image_size=64)
    visa = generate_visa_like(tmp_path / "visa", {"macaroni1": "washer"}, n_good=2, n_defect=1, image_size=(64, 64))
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "HF_HUB_OFFLINE": "1",
        "ANOVL_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    output = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "anovl.cli",
        "protocol",
        "--config",
        str(protocol_file(tmp_path, mvtec, visa)),
        "--output",
        str(output),
    ]
    result = subprocess.run(command, check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    # APRIL-GAN and AnomalyCLIP were fitted once per training dataset; their tests loaded those checkpoints.
    for train in ("MVTec", "VisA"):
        for method in ("APRIL-GAN", "AnomalyCLIP"):
            assert list((output / "fit" / train / method).glob("version_0/checkpoints/last.ckpt"))
    table = (output / "protocol.md").read_text()
    assert "| MVTec → VisA |" in table and "| VisA → MVTec |" in table
    for method in ("AnoVL", "WinCLIP", "APRIL-GAN", "AnomalyCLIP"):
        assert f"{method} pixel AUROC" in table
    rows = (output / "protocol.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 4 * 2  # header + pairs × methods × metrics
    # Run again: everything finished is reused, nothing runs.
    again = subprocess.run(command, check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "anovl protocol: fit" not in again.stdout + again.stderr
    assert (output / "protocol.md").read_text() == table


def test_protocol_file_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"datasets": {"A": [], "B": []}, "pairs": [["A", "C"]], "methods": {"M": {}}}))
    with pytest.raises(AnovlError, match="each pair is"):
        load_protocol(path, None)
    path.write_text(yaml.safe_dump({"datasets": {"A": [], "B": []}, "methods": {"M": {"fit": {"A": []}}}}))
    with pytest.raises(AnovlError, match="must name every training dataset"):
        load_protocol(path, None)
