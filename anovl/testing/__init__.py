"""Fixtures for tests and benchmarks, not for runs: tiny random-weight towers of any open_clip family
(:mod:`anovl.testing.tiny`). The package itself never imports this."""
