"""Benchmark datasets: the generated shapes set and a reader for Karpathy split files."""
