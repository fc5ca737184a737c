"""The ``skillbank`` command line, one module a command group (as ``git`` and ``pip`` are organised).

``app`` is the entry point (``main``: errors to exit codes, warnings, quiet libraries) and assembles the parser;
``running`` (demo, fit, validate, pull), ``localizing`` (localize, route), ``registry`` (list, show, tag, remove,
diff, verify, gc, plot, report) and ``exporting`` (stitch, export) each register their subcommands beside their
handlers; ``common`` holds the argument types and output helpers they share. Only what ``--help`` and ``list``
need is imported up front: torch, transformers and lightning load with the command that uses them.
"""

from skillbank.integrations.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
