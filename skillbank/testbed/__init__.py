"""Benchmark and demo scaffolding, not the product: synthetic tasks, the six real tasks and their pull, the demo."""
