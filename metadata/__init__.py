"""MetaCLIP-style metadata: the sub-string matcher, balancing math, loading and building entry lists."""
from metadata.balancing import (count_entries, entry_probabilities, expected_kept, keep_probabilities, keep_probability,
                                language_threshold, solve_threshold, tail_share, threshold_for_share)
from metadata.entries import MetadataError, load_entries
from metadata.matching import Matcher, entry_key, normalize

__all__ = ["Matcher", "normalize", "entry_key", "load_entries", "MetadataError", "count_entries",
           "entry_probabilities", "keep_probability", "keep_probabilities", "language_threshold", "solve_threshold",
           "tail_share", "threshold_for_share", "expected_kept"]
