"""Official-compatible evaluation (QVHighlights, Charades-STA, TVSum), NumPy only.

Import the functions here from the training loop; `python -m vl.eval` is the command line.
"""

from vl.metrics.charades import evaluate_charades
from vl.metrics.io import EvalInputError, RowSource, load_jsonl
from vl.metrics.qvhighlights import evaluate_qvhighlights
from vl.metrics.selection import selection_score
from vl.metrics.tvsum import evaluate_tvsum, tvsum_annotator_aps, tvsum_top5_map

__all__ = [
    "EvalInputError",
    "RowSource",
    "evaluate_charades",
    "evaluate_qvhighlights",
    "evaluate_tvsum",
    "load_jsonl",
    "selection_score",
    "tvsum_annotator_aps",
    "tvsum_top5_map",
]
