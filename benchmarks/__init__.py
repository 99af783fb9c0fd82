"""The speed and memory benchmark (bench.py); run from the repository root, see README.md here."""
