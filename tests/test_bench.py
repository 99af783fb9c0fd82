"""The benchmark (benchmarks/bench.py, common.py, sections/): its unoptimised baselines give what the optimised
code gives, and it runs.

No timing is asserted: the figures depend on the machine.
"""

import ast
import mmap
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import anovl
from anovl import AnoVL, TTAConfig
from anovl.metrics import AnomalyMetrics, functional
from anovl.models import AnomalyCLIP, AprilGAN
from benchmarks import bench, common
from benchmarks.sections import metrics as metrics_section
from benchmarks.sections import pipeline, precision, throughput
from tests.conftest import TINY
from tests.reference.pipeline import reference_pipeline


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a busy CPU waiting for a second one costs many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_package_imports_neither_the_benchmark_nor_the_tests():
    """benchmarks/ and tests/ are not installed with anovl: nothing in the package may need them."""
    found = []
    for path in sorted(Path(anovl.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            found += [f"{path.name}: {module}" for module in modules if module.split(".")[0] in ("benchmarks", "tests")]
    assert found == []


def tiny(num_views=22, tta=None):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AnoVL(TINY, pretrained=None, num_views=num_views, tta=tta)


@pytest.mark.parametrize("tta", [None, TTAConfig()], ids=["tfa", "tta"])
def test_reference_pipeline_gives_the_outputs_of_anovl(tta):
    """The unoptimised path (one image at a time, one encoder call per view, TTA per image) stays within
    float tolerance of the batched one."""
    model = tiny(tta=tta)
    images = torch.randn(3, 3, 64, 64)
    names = ["bottle", "carpet", "bottle"]
    reference_maps, reference_scores = reference_pipeline(model, images, names)
    output = model(images, names)
    torch.testing.assert_close(reference_maps, output.anomaly_map, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference_scores, output.pred_score, rtol=1e-5, atol=1e-6)


def test_staged_forward_is_the_forward():
    model = tiny(num_views=4, tta=TTAConfig(steps=2))
    images = torch.randn(2, 3, 64, 64)
    names = ["bottle", "carpet"]
    metrics = AnomalyMetrics()
    targets = common.metric_targets(2, 64, torch.device("cpu"))
    timer = common.StageTimer(torch.device("cpu"))
    maps, scores = common.staged_forward(model, images, names, timer, metrics, targets)
    output = model(images, names)
    torch.testing.assert_close(maps, output.anomaly_map)
    torch.testing.assert_close(scores, output.pred_score)
    assert set(timer.seconds) == set(common.STAGES)
    assert metrics.compute()["pixel_auroc"] == pytest.approx(
        functional.auroc(functional.RankedScores.from_maps(maps.numpy(), targets[0].numpy()))
    )


def test_threshold_pro_baseline_agrees_with_the_metrics():
    masks, _ = common.synthetic_masks(24, 64, seed=1)
    maps = common.synthetic_maps(masks, seed=1).numpy()
    masks = masks.numpy()
    scores = functional.RankedScores.from_maps(maps, masks)
    fprs, pros = metrics_section.threshold_pro_curve(maps, masks)
    assert fprs.shape == pros.shape == (200,)
    # Same thresholds, same rule: the cflow-style figure is the same number.
    assert metrics_section.cflow_pro_from_curve(fprs, pros) == pytest.approx(functional.cflow_pro(scores), abs=1e-9)
    # 200 evenly spaced thresholds sample the exact curve: close, not equal.
    assert metrics_section.aupro_from_curve(fprs, pros) == pytest.approx(functional.aupro(scores), abs=0.01)


def test_synthetic_maps_look_like_a_test_set():
    masks, labels = common.synthetic_masks(60, 64)
    maps = common.synthetic_maps(masks)
    assert masks[labels == 0].sum() == 0 and all(m.any() for m in masks[labels == 1])
    assert 0.1 < labels.float().mean() < 0.6
    assert ((maps >= 0) & (maps <= 1)).all()
    assert functional.auroc(functional.RankedScores.from_maps(maps.numpy(), masks.numpy())) > 0.8


def test_peak_memory_sees_fresh_pages():
    meter = common.PeakMemory()
    meter.start()
    # An anonymous mapping is always new memory; a malloc'ed block may reuse pages this long-lived test
    # process already holds (the reason the benchmark measures in fresh processes).
    block = np.frombuffer(mmap.mmap(-1, 64 * 2**20), dtype=np.uint8)
    block[::4096] = 1  # touch every page
    result = meter.stop()
    del block
    if result["extra_rss"] is None:
        pytest.skip("no /proc/self/clear_refs on this system")
    assert result["extra_rss"] >= 60 * 2**20


def test_benchmark_runs_end_to_end():
    config = common.smoke_config(
        threads=None,
        isolate=False,
        sections=tuple(name for name in common.SECTIONS if name != "pipeline"),  # its own (slow) test below
    )
    emitted = []
    report = bench.run_benchmark(config, emitted.append)
    assert len(emitted) == 1 + 7  # header and every section but 'precision' (fp32) and 'pipeline'
    assert "Mode: smoke" in emitted[0]
    for title in (
        "TFA forward vs plain CLIP encode_image",
        "Throughput and stage split",
        "one-image-at-a-time",
        "Text-embedding start-up",
        "Pixel metrics over 12 maps",
        "Lightning test run",
        "one training step against the test forward",
    ):
        assert title in report
    for name, _, _ in throughput.PIPELINES:
        assert report.count(f"| {name} |") == 2  # one row per batch size
    assert "nan" not in report.lower()
    for method in (AprilGAN, AnomalyCLIP):
        assert report.count(f"| {method.method}[") == 2  # one row per batch size


def test_precision_section_reports_the_change(tmp_path):
    config = common.quick_config(
        backbone=TINY,
        batch_sizes=(2,),
        repeats=1,
        precision="bf16",
        precision_categories=1,
        precision_good=1,
        precision_defect=1,
        threads=None,
    )
    text = precision.precision_section(config, torch.device("cpu"), tmp_path).markdown()
    assert "max abs Δ, TFA map" in text and "pixel AUROC, TTA" in text and "forward time, batch 2" in text


@pytest.mark.slow  # two `anovl test` runs in child processes
def test_pipeline_section_runs_the_cli_and_reports_every_ratio(tmp_path):
    config = common.quick_config(
        backbone=TINY,
        batch_sizes=(2,),
        repeats=1,
        pipeline_categories=1,
        pipeline_good=12,
        pipeline_defect=1,
        pipeline_size=96,
        pipeline_views=(1,),
        threads=None,
    )
    text = pipeline.pipeline_section(config, torch.device("cpu"), tmp_path).markdown()
    for row in (
        "`anovl test`, 1 view",
        "data path, CPU ms/image",
        "loader, 1 worker",
        "decoded cache, first pass",
        "decoded cache, second pass",
    ):
        assert row in text
    assert "hit rate 100%" in text and "nan" not in text.lower()


def test_a_misspelt_option_is_refused_not_taken_as_a_prefix(capsys):
    assert bench.parse_args(["--baseline-maps", "3"]).baseline_maps == 3
    with pytest.raises(SystemExit):
        bench.parse_args(["--baseline-map", "3"])
    assert "unrecognized arguments: --baseline-map" in capsys.readouterr().err


GPU_SH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


def gpu_sh_runs() -> list[tuple[str, int, list[str]]]:
    """gpu.sh's ``run NAME SECONDS ARGS...`` lines."""
    runs = re.findall(r"^run (\S+) (\d+) (.*)$", GPU_SH.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return [(name, int(limit), args.split()) for name, limit, args in runs]


def test_gpu_sh_fits_its_budget_and_every_command_parses():
    runs = gpu_sh_runs()
    assert sum(limit for _, limit, _ in runs) <= 460  # + start-up: the whole script within 8 minutes
    assert len({name for name, _, _ in runs}) == len(runs)  # one report file each
    covered = set()
    for _, _, args in runs:
        options = bench.parse_args(["--device", "cpu", *args])
        covered.update(options.sections)
    assert covered == set(common.SECTIONS) - {"text"}  # text-cache start-up: measured on the CPU only


@pytest.mark.slow  # ten processes, each importing torch; minutes on a busy 2-core machine
def test_gpu_sh_dry_run_writes_every_section_under_out(tmp_path):
    repository = GPU_SH.parents[1]
    ignored = ["git", "-C", str(repository), "status", "--porcelain", "--ignored"]
    before = subprocess.run(ignored, capture_output=True, text=True, check=True).stdout
    environment = {
        **os.environ,
        "GPU_SH_SMOKE": "1",
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "ANOVL_CACHE_DIR": str(tmp_path / "cache" / "anovl"),
    }
    finished = subprocess.run(["bash", str(GPU_SH)], env=environment, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    for name, _, _ in gpu_sh_runs():
        report = (tmp_path / "out" / f"{name}.md").read_text(encoding="utf-8")
        assert "Mode: smoke" in report and "section took" in report, name
        assert (tmp_path / "out" / f"{name}.log").is_file()
    assert not (tmp_path / "cache" / "anovl").exists()  # nothing in the user's anovl cache
    assert subprocess.run(ignored, capture_output=True, text=True, check=True).stdout == before  # nor the repository
