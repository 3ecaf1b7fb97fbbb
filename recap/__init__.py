"""recap: curate, recaption and reinforce image-text data for CLIP-style pretraining, on Ray.

One import package. The repository's top-level folders are installed beneath it:
``recap.pipeline`` (the engine), ``recap.stages``, ``recap.models`` (the encoders stages share),
``recap.metadata``, ``recap.trainer``, ``recap.world`` (the demo web) and ``recap.jobs`` (bundled
job files); this folder holds the command line (``recap.cli``), the composition root that wires
them together.
"""
__version__ = "0.1.0"
