"""recap's engine: job files, the Stage API, the Ray runner, dataset I/O, ledger and CLI."""
__version__ = "0.1.0"
