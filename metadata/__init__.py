"""MetaCLIP-style metadata: the sub-string matcher, balancing math, loading and building entry lists."""
from recap.metadata.balancing import (count_entries, entry_probabilities, expected_kept, keep_probabilities, keep_probability,
                                language_threshold, solve_threshold, tail_share, threshold_for_share)
from recap.metadata.entries import MetadataError, load_entries
from recap.metadata.matcher import Matcher
from recap.metadata.normalize import entry_key, is_cjk_or_similar, normalize, prepare, spacing

__all__ = ["Matcher", "normalize", "prepare", "spacing", "entry_key", "is_cjk_or_similar", "load_entries", "MetadataError",
           "count_entries", "entry_probabilities", "keep_probability", "keep_probabilities", "language_threshold",
           "solve_threshold", "tail_share", "threshold_for_share", "expected_kept"]
