"""The benchmark's sections, one module each; every section is a function ``(config, device, workdir) -> Section``.

A new section (a method's own lines, a training step) is one module here with its function added to
:data:`SECTION_FUNCTIONS` and its name to :data:`benchmarks.common.SECTIONS` (in the order a report shows them),
plus a row in benchmarks/README.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from benchmarks.common import SECTIONS, BenchConfig, Section
from benchmarks.sections.encoder import encoder_section
from benchmarks.sections.fit import fit_section
from benchmarks.sections.metrics import metrics_section
from benchmarks.sections.pipeline import pipeline_section
from benchmarks.sections.precision import precision_section
from benchmarks.sections.reference import reference_section
from benchmarks.sections.testrun import testrun_section
from benchmarks.sections.text import text_section
from benchmarks.sections.throughput import throughput_section

SectionFunction = Callable[[BenchConfig, torch.device, Path], Section]

SECTION_FUNCTIONS: dict[str, SectionFunction] = {
    "pipeline": pipeline_section,
    "throughput": throughput_section,
    "reference": reference_section,
    "encoder": encoder_section,
    "text": text_section,
    "metrics": metrics_section,
    "testrun": testrun_section,
    "precision": precision_section,
    "fit": fit_section,
}
assert tuple(SECTION_FUNCTIONS) == SECTIONS, "benchmarks.common.SECTIONS lists the sections in report order"
