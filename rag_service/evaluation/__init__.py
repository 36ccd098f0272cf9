"""The evaluation harness: score retrieval and answers on a labelled question set.

    rag eval questions.jsonl -c docs --ingest docs/ --out results.json \\
        --gate hybrid.ndcg@10>=0.6 --gate direct.contains>=0.5

``dataset`` reads and checks the JSONL set, ``metrics`` defines every figure
(pure functions), ``backends`` sends questions in process or over HTTP,
``runner`` runs a set through a backend, ``report`` prints tables and writes
JSON, ``gates`` checks thresholds, and ``command`` is the CLI entry.
"""

from rag_service.evaluation.dataset import DatasetError, Label, Question, load_dataset
from rag_service.evaluation.runner import EvalOptions, EvalResult, evaluate

__all__ = [
    "DatasetError",
    "EvalOptions",
    "EvalResult",
    "Label",
    "Question",
    "evaluate",
    "load_dataset",
]
