"""Request bodies -> validated samples, or a `RequestError` naming the field that is wrong.

Why every check happens here, before batching: requests from different clients share one
forward pass, so a malformed one must be turned away on its own (a 4xx naming its field)
instead of failing the batch it would have joined, and nothing a client sends may reach the
model as a traceback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


class RequestError(Exception):
    """A client error: HTTP `status`, the offending `field` (dotted/indexed path) and why."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "field": self.field, "message": self.message}}


@dataclass(frozen=True)
class Limits:
    """What one request may carry: set by the server options and the served model."""

    max_body_bytes: int
    max_samples: int
    max_clips: int  # the model's data.max_v_l: longer videos were never seen in training
    video_dim: int  # per-clip width incl. the 2 TEF dims
    text_dim: int


def parse_json(body: bytes, limit: int) -> Any:
    """The decoded JSON body; 413 past `limit` bytes, 400 when it is not JSON."""
    if len(body) > limit:
        raise RequestError(413, None, f"request body is {len(body)} bytes; the limit is {limit}")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, None, f"request body is not valid JSON: {err}") from None


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise RequestError(422, None, f"request body must be a JSON object, got "
                                      f"{type(body).__name__}")
    return body


def _matrix(value: Any, field: str, width: int, what: str) -> np.ndarray:
    """A (rows, width) float32 array of finite numbers, or a 422 naming `field`."""
    try:
        array = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError):
        raise RequestError(422, field, f"{field} must be a rectangular {what} array of "
                                       "numbers") from None
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != width:
        raise RequestError(422, field, f"{field} has shape {list(array.shape)}; expected "
                                       f"[n >= 1, {width}] ({what})")
    if not np.isfinite(array).all():
        raise RequestError(422, field, f"{field} holds non-finite numbers")
    return array


def features_samples(body: Any, limits: Limits) -> list[dict[str, Any]]:
    """POST /v1/predict: the pyfunc's column input -> one dict per sample.

    `{"video_features": [(clips, Dv+2)...], "text_features": [(tokens, Dt)...],
      "duration": [s...]?, "qid": [...]?}`; video features normalised with TEF appended, as
    the registered model's input (GET /v1/model gives the widths).
    """
    body = _object(body)
    for key in ("video_features", "text_features"):
        if key not in body:
            raise RequestError(422, key, f"missing key {key!r} (the body has "
                                         f"{sorted(body)})")
        if not isinstance(body[key], list) or not body[key]:
            raise RequestError(422, key, f"{key} must be a non-empty list with one entry "
                                         "per sample")
    count = len(body["video_features"])
    if count > limits.max_samples:
        raise RequestError(422, "video_features", f"{count} samples in one request; the limit "
                                                  f"is {limits.max_samples}")
    for key in ("text_features", "duration", "qid"):
        if key in body and (not isinstance(body[key], list) or len(body[key]) != count):
            raise RequestError(422, key, f"{key} must be a list of {count} entries (one per "
                                         "video_features sample)")
    samples = []
    for i in range(count):
        video = _matrix(body["video_features"][i], f"video_features[{i}]", limits.video_dim,
                        "clips x (features + 2 TEF)")
        if len(video) > limits.max_clips:
            raise RequestError(422, f"video_features[{i}]", f"video_features[{i}] has "
                               f"{len(video)} clips; this model takes at most "
                               f"{limits.max_clips}")
        text = _matrix(body["text_features"][i], f"text_features[{i}]", limits.text_dim,
                       "tokens x text dims")
        sample: dict[str, Any] = {"video_features": video, "text_features": text}
        if "duration" in body:
            sample["duration"] = _duration(body["duration"][i], f"duration[{i}]")
        if "qid" in body:
            sample["qid"] = body["qid"][i]
        samples.append(sample)
    return samples


def _duration(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0):
        raise RequestError(422, field, f"{field} must be a positive number of seconds")
    return float(value)


def video_query(body: Any) -> str:
    """POST /v1/videos/{vid}/predict: `{"query": TEXT}` -> the query text, stripped."""
    query = _object(body).get("query")
    if not isinstance(query, str) or not query.strip():
        raise RequestError(422, "query", "query must be a non-empty string")
    return query.strip()
