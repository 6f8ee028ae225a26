"""The Ray Serve application: one FastAPI deployment that owns the model, the batch queue and
the page, so a replica is the whole service and `--replicas N` scales all of it.

Why one deployment and not an ingress in front of a model deployment: on small machines the
extra hop (a second actor call per request) costs more than it buys; the model work is one
batched forward pass per `@serve.batch` call, run in a thread so the event loop keeps
accepting the requests that form the next batch.

`build(args)` is the application builder: `python -m jobs.serve` calls it with its flags and a
Serve config file names it (`import_path: jobs.serve.app:build`, cluster/serve.yaml).
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' types at
# runtime, and Serve's ingress wrapper hides this module's globals from string annotations.
import asyncio
import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException

from jobs.serve.catalog import VIDEO_TYPES, Catalog
from jobs.serve.model import ModelRef, ServedModel, load
from jobs.serve.requests import Limits, RequestError, features_samples, parse_json, video_query

PAGE_DIR = Path(__file__).resolve().parent / "page"
PAGE_ASSETS = {"page.js": "text/javascript", "page.css": "text/css"}
# The first words of the one line a replica that cannot start raises; the CLI looks for it.
START_FAILED = "videolights-serve cannot start:"

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ServeOptions:
    """Everything the application needs; the CLI flags and a Serve config's `args` map 1:1."""

    model: str  # models:/NAME@ALIAS or models:/NAME/VERSION
    data: str = ""  # shard set whose videos the page offers ("" = no page data, no /v1/videos)
    videos: str = ""  # local folder with VID.mp4|webm|ogv files the page can play
    follow_alias: bool = False  # reload when the alias moves to another version
    poll_s: float = 10.0  # how often a replica checks the alias
    max_batch_size: int = 16  # requests per forward pass
    batch_wait_s: float = 0.005  # how long a batch waits to fill after its first request
    max_samples: int = 32  # samples per /v1/predict request
    max_body_mb: float = 16.0
    replicas: int = 1
    num_cpus: float = 1.0  # per replica
    tracking_uri: str = ""  # the MLflow server replicas load from ("" = MLFLOW_TRACKING_URI)

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> "ServeOptions":
        """Typed, checked options; unknown keys and out-of-range values are errors."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown serve option(s) {unknown}; known: {sorted(known)}")
        if "model" not in args:
            raise ValueError("serve option 'model' is required (models:/NAME@ALIAS)")
        options = cls(**args)
        ModelRef.parse(options.model)
        for name in ("poll_s", "batch_wait_s", "max_body_mb", "num_cpus"):
            value = getattr(options, name)
            if not isinstance(value, int | float) or value < 0 or (value == 0 and name in (
                    "poll_s", "max_body_mb")):
                raise ValueError(f"serve option {name}={value!r} must be a positive number")
        for name in ("max_batch_size", "max_samples", "replicas"):
            value = getattr(options, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"serve option {name}={value!r} must be an integer >= 1")
        return options


@dataclass(frozen=True)
class _Live:
    """What answers right now; replaced as a whole when the alias moves (one reference swap,
    so a batch that already took it finishes on the version it started with)."""

    served: ServedModel
    catalog: Catalog | None
    limits: Limits


def _start(options: ServeOptions, ref: ModelRef, version: str,
           previous: _Live | None = None) -> _Live:
    served = load(ref, version)
    catalog = None
    if options.data:
        same_inputs = previous is not None and previous.served.info()["feature_sets"] == \
            served.info()["feature_sets"] and previous.served.cfg.data == served.cfg.data
        catalog = previous.catalog if same_inputs else Catalog.from_shards(
            options.data, served.cfg, options.videos)
    limits = Limits(max_body_bytes=int(options.max_body_mb * 2**20),
                    max_samples=options.max_samples, max_clips=served.max_clips,
                    video_dim=served.video_dim, text_dim=served.text_dim)
    return _Live(served, catalog, limits)


# FastAPI's route table for the deployment below (Serve's ingress pattern binds the app to
# the class at definition time); it holds routes only, no state.
api = FastAPI(title="VideoLights", docs_url=None, redoc_url=None, openapi_url=None)


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse(RequestError(status, field, message).body(), status_code=status)


@api.exception_handler(RequestError)
async def _request_error(_request: Request, err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(HTTPException)
async def _http_error(_request: Request, err: HTTPException) -> JSONResponse:
    return _error(err.status_code, str(err.detail))


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
    first = (err.errors() or [{}])[0]
    field = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
    return _error(422, str(first.get("msg", "invalid request")), field)


@api.exception_handler(Exception)
async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return _error(500, f"internal error ({type(err).__name__}); the server log has details")


async def _body(request: Request, limit: int) -> Any:
    """The JSON body, refused (413) as soon as it passes `limit` bytes, before parsing."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, None, f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, None, f"request body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return parse_json(b"".join(chunks), limit)


@serve.deployment
@serve.ingress(api)
class VideoLightsServer:
    """One replica: the loaded model (optionally following its alias), the data set's videos,
    the batch queue and the page."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.ref = ModelRef.parse(options.model)
        try:
            self._live = _start(options, self.ref, self.ref.resolve())
        except Exception as err:  # one line the CLI and `serve status` show, no traceback
            reason = " ".join(line.strip() for line in str(err).strip().splitlines()[:2])
            raise RuntimeError(f"{START_FAILED} {self.ref.uri}: {type(err).__name__}: "
                               f"{reason[:300]}") from None
        self._run_batch.set_max_batch_size(options.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(options.batch_wait_s)
        self._stop = threading.Event()
        if options.follow_alias and self.ref.alias:
            threading.Thread(target=self._follow_alias, name="follow-alias", daemon=True).start()

    def __del__(self) -> None:
        self._stop.set()

    def _follow_alias(self) -> None:
        """Poll the alias; load a new version beside the serving one, then swap them."""
        while not self._stop.wait(self.options.poll_s):
            try:
                version = self.ref.resolve()
                if version != self._live.served.version:
                    log.info("alias %s moved to version %s: loading", self.ref.uri, version)
                    self._live = _start(self.options, self.ref, version, self._live)
                    log.info("now serving %s version %s", self.ref.name, version)
            except Exception:  # registry down or a bad version: keep serving the current one
                log.exception("following %s failed; still serving version %s", self.ref.uri,
                              self._live.served.version)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _run_batch(self, requests: list[list[dict]]) -> list[tuple[list[dict], dict]]:
        """All samples of up to max_batch_size requests in one forward pass."""
        served = self._live.served
        flat = [sample for samples in requests for sample in samples]
        rows = await asyncio.to_thread(served.predict, flat)
        answered = {"name": served.name, "version": served.version}
        out, start = [], 0
        for samples in requests:
            out.append((rows[start:start + len(samples)], answered))
            start += len(samples)
        return out

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        served = self._live.served
        return {"status": "ok", "model": served.name, "version": served.version}

    @api.get("/v1/model")
    def model_info(self) -> dict[str, Any]:
        return {**self._live.served.info(), "follow_alias": self.options.follow_alias,
                "poll_s": self.options.poll_s, "has_data": self._live.catalog is not None}

    @api.post("/v1/predict")
    async def predict(self, request: Request) -> dict[str, Any]:
        limits = self._live.limits
        samples = features_samples(await _body(request, limits.max_body_bytes), limits)
        rows, answered = await self._run_batch(samples)
        predictions = [
            {"qid": sample.get("qid", i), **{k: v for k, v in row.items() if k.startswith("pred_")}}
            for i, (sample, row) in enumerate(zip(samples, rows, strict=True))
        ]
        return {"model": answered, "predictions": predictions}

    def _catalog(self) -> Catalog:
        if self._live.catalog is None:
            raise RequestError(404, None, "this server was started without --data: it serves "
                                          "no videos, only POST /v1/predict")
        return self._live.catalog

    @api.get("/v1/videos")
    def videos(self) -> dict[str, Any]:
        return {"videos": self._catalog().listing()}

    @api.post("/v1/videos/{vid}/predict")
    async def predict_video(self, vid: str, request: Request) -> dict[str, Any]:
        catalog = self._catalog()
        query = video_query(await _body(request, self._live.limits.max_body_bytes))
        sample = catalog.sample(vid, query)
        (row,), answered = await self._run_batch([sample])
        clip_len = float(self._live.served.cfg.data.clip_len)
        return {"model": answered, "vid": vid, "query": sample["query"],
                "duration": sample["duration"], "clip_len_s": clip_len,
                "pred_relevant_windows": row["pred_relevant_windows"],
                "pred_saliency_scores": row["pred_saliency_scores"]}

    @api.get("/v1/videos/{vid}/file")
    def video_file(self, vid: str) -> FileResponse:
        path = self._catalog().video(vid).file
        if path is None:
            raise RequestError(404, "vid", f"no video file for {vid!r} (start the server with "
                                           "--videos DIR holding VID.mp4)")
        return FileResponse(path, media_type=VIDEO_TYPES[path.suffix])

    @api.get("/", response_class=HTMLResponse)
    def page(self) -> HTMLResponse:
        return HTMLResponse((PAGE_DIR / "index.html").read_text())

    @api.get("/page/{name}")
    def page_asset(self, name: str) -> FileResponse:
        if name not in PAGE_ASSETS:
            raise RequestError(404, None, f"no page asset {name!r}")
        return FileResponse(PAGE_DIR / name, media_type=PAGE_ASSETS[name])


def build(args: dict[str, Any]) -> Application:
    """The application for `args` (ServeOptions fields): what `serve run`/`serve deploy` and
    `python -m jobs.serve` deploy. Replicas get the tracking URI the builder saw, so they load
    from the registry the alias was resolved in."""
    options = ServeOptions.from_dict(args)
    tracking_uri = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    env = {"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}
    return VideoLightsServer.options(
        num_replicas=options.replicas,
        # room for one batch computing and the next one filling
        max_ongoing_requests=2 * options.max_batch_size,
        max_constructor_retry_count=1,  # a broken model fails fast; one retry for a blip
        ray_actor_options={"num_cpus": options.num_cpus, "runtime_env": {"env_vars": env}},
    ).bind(options)
