"""Evaluation of image–text models on a labelled set: zero-shot classification, retrieval, a
compositional (SugarCrepe/ARO-style) test and a linear probe; ``recap eval``.

``sets`` reads labelled sets (the layouts are described there), ``embed`` turns them into
features, ``metrics`` scores features, ``tasks`` runs ``evaluate``, ``probe`` the linear probe,
``report`` presents results, ``clip_benchmark`` bridges to that package and ``cli`` is
``recap eval``.
"""
from recap.trainer.eval.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, eval_cli
from recap.trainer.eval.clip_benchmark import run_clip_benchmark
from recap.trainer.eval.embed import PRECISIONS, class_embeddings, encode_split
from recap.trainer.eval.metrics import RECALL_KS, compositional_metrics, retrieval_metrics, zeroshot_metrics
from recap.trainer.eval.probe import linear_probe
from recap.trainer.eval.report import flatten, format_table
from recap.trainer.eval.sets import DEFAULT_TEMPLATES, IMAGE_EXTS, iter_samples, list_shards
from recap.trainer.eval.tasks import TASKS, evaluate

__all__ = [
    "DEFAULT_TEMPLATES", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "IMAGE_EXTS", "PRECISIONS", "RECALL_KS", "TASKS",
    "class_embeddings", "compositional_metrics", "encode_split", "eval_cli", "evaluate", "flatten", "format_table",
    "iter_samples", "linear_probe", "list_shards", "retrieval_metrics", "run_clip_benchmark", "zeroshot_metrics",
]
