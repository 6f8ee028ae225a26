"""JSONL reading and input validation shared by every benchmark's evaluation.

Why a module of its own: the official scripts crash with a traceback (or, worse, silently compute
on garbage) when a submission is malformed. Here every check raises `EvalInputError` with a
message that names the file and line (JSON errors) or the row, qid and field (semantic errors), so
the CLI can print one line and exit non-zero, and the training loop gets the same clear message.
Only the standard library and NumPy are imported (the CLI's start-up time is part of its budget).
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAX_LISTED_QIDS = 5  # how many qids an error message lists before "..."


class EvalInputError(ValueError):
    """The evaluation input is malformed; the message says where (file:line or qid + field)."""


@dataclass(frozen=True)
class RowSource:
    """Where a list of rows came from, so errors can say `file:line` instead of a list index.

    `lines[i]` is the 1-based line number of row i in the file `name`; without `lines` the
    message falls back to the row's position in the list (training-loop callers have no file).
    """

    name: str
    lines: Sequence[int] | None = None

    def where(self, index: int) -> str:
        if self.lines is not None and index < len(self.lines):
            return f"{self.name}:{self.lines[index]}"
        return f"{self.name} row {index + 1}"


def load_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Read a JSONL file into (rows, line numbers); blank lines are skipped.

    Each non-blank line must be one JSON object; the error names `file:line` and the parser's
    complaint.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalInputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalInputError(f"{path}: cannot read: {exc}") from None
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    # Fast path: one parser call for the whole file (about 2-3x faster than per line); any
    # doubt (a parse error, a line holding several values, a non-object) -> per-line parse,
    # which finds the exact line to blame.
    try:
        rows = json.loads("[" + ",".join(line for _, line in numbered) + "]")
    except (ValueError, RecursionError):
        rows = None
    if (
        rows is None
        or len(rows) != len(numbered)
        or not all(isinstance(row, dict) for row in rows)
    ):
        rows = [_parse_line(path, n, line) for n, line in numbered]
    lines = [n for n, _ in numbered]
    if not rows:
        raise EvalInputError(f"{path}: no rows (the file is empty)")
    return rows, lines


def _parse_line(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EvalInputError(
            f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})"
        ) from None
    except RecursionError:
        raise EvalInputError(f"{path}:{number}: JSON nested too deeply") from None
    except ValueError as exc:  # an integer literal beyond Python's digit limit
        raise EvalInputError(f"{path}:{number}: unreadable JSON value ({exc})") from None
    if not isinstance(row, dict):
        raise EvalInputError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    return row


def row_qids(rows: Sequence[Any], source: RowSource) -> list[Hashable]:
    """The qid of every row, checking rows are objects with a unique int/str `qid`."""
    if not isinstance(rows, Sequence) or isinstance(rows, str | bytes):
        raise EvalInputError(f"{source.name}: expected a list of rows, got {type(rows).__name__}")
    if len(rows) == 0:
        raise EvalInputError(f"{source.name}: no rows")
    qids: list[Hashable] = []
    first_seen: dict[Hashable, int] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise EvalInputError(f"{source.where(i)}: expected an object, got {type(row).__name__}")
        if "qid" not in row:
            raise EvalInputError(f"{source.where(i)}: missing field 'qid'")
        qid = row["qid"]
        if isinstance(qid, bool) or not isinstance(qid, int | str):
            raise EvalInputError(
                f"{source.where(i)}: field 'qid' must be an integer or a string, got {qid!r}"
            )
        if qid in first_seen:
            raise EvalInputError(
                f"{source.where(i)}: qid {qid!r} appears twice "
                f"(first at {source.where(first_seen[qid])})"
            )
        first_seen[qid] = i
        qids.append(qid)
    return qids


def _listed(qids: Sequence[Hashable]) -> str:
    shown = ", ".join(repr(q) for q in qids[:MAX_LISTED_QIDS])
    return shown + (", ..." if len(qids) > MAX_LISTED_QIDS else "")


def match_qids(
    sub_qids: Sequence[Hashable],
    gt_qids: Sequence[Hashable],
    match_number: bool,
    sub_source: RowSource,
    gt_source: RowSource,
) -> list[Hashable]:
    """The qids to evaluate, in submission order.

    `match_number=True` is the official default: the two qid sets must be identical (the
    official script asserts); the error says how many are missing/extra and lists the first few.
    With False, both sides are intersected.
    """
    gt_set = set(gt_qids)
    sub_set = set(sub_qids)
    if match_number:
        missing = [q for q in gt_qids if q not in sub_set]
        extra = [q for q in sub_qids if q not in gt_set]
        if missing or extra:
            parts = []
            if missing:
                parts.append(
                    f"{len(missing)} qid(s) of {gt_source.name} missing from {sub_source.name} "
                    f"(first: {_listed(missing)})"
                )
            if extra:
                parts.append(
                    f"{len(extra)} extra qid(s) in {sub_source.name} not in {gt_source.name} "
                    f"(first: {_listed(extra)})"
                )
            raise EvalInputError(
                "qids differ between prediction and ground truth: " + "; ".join(parts)
            )
        return list(sub_qids)
    shared = [q for q in sub_qids if q in gt_set]
    if not shared:
        raise EvalInputError(f"no qid is shared by {sub_source.name} and {gt_source.name}")
    return shared


def field(row: dict[str, Any], name: str, source: RowSource, index: int) -> Any:
    """`row[name]`, or an error naming the row, qid and the missing field."""
    try:
        return row[name]
    except KeyError:
        raise EvalInputError(
            f"{source.where(index)}: qid {row.get('qid')!r}: missing field '{name}'"
        ) from None


def _bad(source: RowSource, index: int, qid: Any, name: str, what: str) -> EvalInputError:
    return EvalInputError(f"{source.where(index)}: qid {qid!r}: field '{name}': {what}")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def number_matrix(
    value: Any, width: int, source: RowSource, index: int, qid: Any, name: str, *,
    allow_empty: bool,
) -> np.ndarray:
    """A list of rows of >= `width` finite numbers as a float64 (k, width) array.

    Fast path: one `np.array` call; only when that fails or looks wrong do we walk the list in
    Python to find the first bad entry and say which one.
    """
    if isinstance(value, list) and value:
        try:
            arr = np.array(value)
        except ValueError:
            arr = None
        if (
            arr is not None
            and arr.ndim == 2
            and arr.shape[1] >= width
            and arr.dtype.kind in "if"
        ):
            arr = arr[:, :width].astype(np.float64, copy=False)
            if np.isfinite(arr).all():
                return arr
    if not isinstance(value, list):
        raise _bad(source, index, qid, name, f"expected a list, got {type(value).__name__}")
    if not value:
        if allow_empty:
            return np.zeros((0, width))
        raise _bad(source, index, qid, name, "is empty")
    for j, item in enumerate(value):
        if not isinstance(item, list) or len(item) < width:
            raise _bad(source, index, qid, name,
                       f"entry {j} must be a list of {width} numbers, got {item!r}")
        for x in item[:width]:
            if not _is_number(x):
                raise _bad(source, index, qid, name, f"entry {j} has a non-number {x!r}")
            if not math.isfinite(x):
                raise _bad(source, index, qid, name, f"entry {j} has a non-finite value {x!r}")
    # Valid but irregular (e.g. some windows carry extra entries): build it entry by entry.
    return np.array([item[:width] for item in value], dtype=np.float64)


def windows(
    value: Any, width: int, source: RowSource, index: int, qid: Any, name: str, *,
    allow_empty: bool, reversed_ok: bool = False,
) -> np.ndarray:
    """Windows `[[st, ed(, score)], ...]` as (k, width) float64; NaN is an error, and so is
    ed < st unless `reversed_ok` (the caller then scores such a window)."""
    arr = number_matrix(value, width, source, index, qid, name, allow_empty=allow_empty)
    if reversed_ok:
        return arr
    negative = np.flatnonzero(arr[:, 1] < arr[:, 0])
    if negative.size:
        j = int(negative[0])
        raise _bad(source, index, qid, name,
                   f"window {j} has negative length (st={arr[j, 0]!r} > ed={arr[j, 1]!r})")
    return arr


def number_vector(
    value: Any, source: RowSource, index: int, qid: Any, name: str
) -> np.ndarray:
    """A non-empty list of finite numbers as float64 (k,)."""
    if isinstance(value, list) and value:
        try:
            arr = np.array(value)
        except ValueError:
            arr = None
        if arr is not None and arr.ndim == 1 and arr.dtype.kind in "if":
            arr = arr.astype(np.float64, copy=False)
            if np.isfinite(arr).all():
                return arr
    if not isinstance(value, list):
        raise _bad(source, index, qid, name, f"expected a list, got {type(value).__name__}")
    if not value:
        raise _bad(source, index, qid, name, "is empty")
    for j, x in enumerate(value):
        if not _is_number(x):
            raise _bad(source, index, qid, name, f"entry {j} is not a number: {x!r}")
        if not math.isfinite(x):
            raise _bad(source, index, qid, name, f"entry {j} is not finite: {x!r}")
    return np.array(value, dtype=np.float64)


def flat_numbers(
    values: Sequence[Any], width: int, *, kinds: str = "if", exact: bool = False
) -> tuple[np.ndarray, np.ndarray] | None:
    """Concatenate per-row lists in one NumPy call: ((M, width) or (M,) array, counts).

    width 0 means one scalar per entry. The result keeps its dtype (kind in `kinds`, "if" =
    int or float; floats are not cast). Returns None when anything is not a plain list of
    numbers of the right shape (`exact`: exactly `width` per entry, else at least, truncated);
    the caller then validates row by row to produce the precise message. Finiteness and value
    checks are left to the caller (vectorised there).
    """
    try:
        if not all(type(v) is list for v in values):
            return None
        counts = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
        flat = [x for v in values for x in v]
        arr = np.array(flat) if flat else np.zeros((0, width) if width else (0,), np.int64)
    except (TypeError, ValueError):
        return None
    if arr.dtype.kind not in kinds:
        return None
    if width == 0:
        return (arr, counts) if arr.ndim == 1 else None
    if arr.ndim != 2 or arr.shape[1] < width or (exact and arr.shape[1] != width):
        return None
    return arr[:, :width], counts


def rows_of(counts: np.ndarray) -> np.ndarray:
    """Row number of every flat entry, for counts per row."""
    return np.repeat(np.arange(len(counts)), counts)


def bad_field(source: RowSource, index: int, qid: Any, name: str, what: str) -> EvalInputError:
    """An `EvalInputError` for a semantic problem in one field of one row."""
    return _bad(source, index, qid, name, what)


def json_safe(value: Any) -> Any:
    """`value` with every NaN / infinity replaced by None: metric files are JSON (NaN is not),
    and a metric that could not be computed reads as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value

