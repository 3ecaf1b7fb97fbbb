"""recap's engine: job files, the Stage API, the Ray runner, dataset I/O, commit markers and the
ledger, plus shared mechanics stages use (HTTP fetching, image checks, URL-list reading, the
reinforced shard format). It names no stage and imports nothing above it."""
__version__ = "0.1.0"
