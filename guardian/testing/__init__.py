"""Helpers for tests, demos and benchmarks: a tiny real training run and the fault injector loaded through sitecustomize."""
