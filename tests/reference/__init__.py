"""Oracles of the test suite: straightforward re-implementations that the optimised code is checked against.

Each module says what it is the oracle of. They stay independent of the code they check: they import torch,
numpy, scipy or sklearn, and from anovl only the pieces they are not an oracle of (the encoder, the text
embeddings, the views), never the function whose result they reproduce. The benchmark
(benchmarks/sections/reference.py) times :func:`tests.reference.pipeline.reference_pipeline` against AnoVL.

``anomalib_winclip.py`` is not imported: tests/test_winclip_parity.py runs it in a subprocess with anomalib
2.7.0 installed from ``requirements-anomalib.txt``.
"""
