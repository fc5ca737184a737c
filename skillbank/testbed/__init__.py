"""Demo scaffolding, not the product: the synthetic tasks and ``skillbank demo``. It sits above the package:
nothing in it is imported by the product but the ``demo`` command (the real model and data sets are
:mod:`skillbank.integrations.pulled`)."""
