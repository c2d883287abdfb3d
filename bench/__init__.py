"""Benchmarks of Tollgate (run each as ``python -m bench.<name>``; see bench/README.md)."""
