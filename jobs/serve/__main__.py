"""python -m jobs.serve: serve a registered model over HTTP with Ray Serve, until interrupted.

Preflight on the driver first (tracking server, alias, shard set: exit 2 with one line), then
the application is deployed on the Ray cluster RAY_ADDRESS names (a GCS address; unset: a
Ray instance started by this process). A replica that cannot load the model stops the
deployment: this process prints the replica's one-line reason and exits 1. On SIGINT/SIGTERM
the application is deleted, and Serve shut down when no other application is left on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import ray
from ray import serve

from jobs.preflight import EXIT_BAD_INPUT, PreflightError, check_tracking, require_manifest
from jobs.serve.app import START_FAILED, ServeOptions, build
from jobs.serve.model import ModelRef, ModelResolutionError

EXIT_START_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    d = ServeOptions(model="models:/x@y")  # defaults, for the help text
    p = argparse.ArgumentParser(
        prog="python -m jobs.serve",
        description="Serve a registered VideoLights model with Ray Serve: POST /v1/predict "
                    "(per-sample features -> official rows), GET /healthz, GET /v1/model, and "
                    "with --data a web page at / over the data set's videos. Needs "
                    "MLFLOW_TRACKING_URI; RAY_ADDRESS (GCS address) names the cluster.",
    )
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS (e.g. @champion) or models:/NAME/VERSION")
    p.add_argument("--host", default="127.0.0.1",
                   help="HTTP bind address of Serve's proxy (0.0.0.0 for other machines)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--num-cpus", type=float, default=d.num_cpus,
                   help="CPUs reserved per replica (fractions allowed)")
    p.add_argument("--follow-alias", action="store_true",
                   help="reload when the alias moves to another version (in-flight requests "
                        "finish on the old one)")
    p.add_argument("--poll-s", type=float, default=d.poll_s,
                   help="seconds between alias checks (default %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help="requests per forward pass (default %(default)s)")
    p.add_argument("--batch-wait-s", type=float, default=d.batch_wait_s,
                   help="how long a batch waits to fill (default %(default)s)")
    p.add_argument("--max-samples", type=int, default=d.max_samples,
                   help="samples per /v1/predict request (default %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_mb)
    p.add_argument("--data", default="",
                   help="shard set (local dir or s3://) whose videos the page and "
                        "/v1/videos offer")
    p.add_argument("--videos", default="",
                   help="local folder of VID.mp4/webm/ogv files the page can play")
    p.add_argument("--name", default="videolights", help="Serve application name")
    p.add_argument("--route-prefix", default="/", help="HTTP route prefix (default /)")
    return p


def _options(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions.from_dict({
        "model": args.model, "data": args.data, "videos": args.videos,
        "follow_alias": args.follow_alias, "poll_s": args.poll_s,
        "max_batch_size": args.max_batch_size, "batch_wait_s": args.batch_wait_s,
        "max_samples": args.max_samples, "max_body_mb": args.max_body_mb,
        "replicas": args.replicas, "num_cpus": args.num_cpus,
        "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI", ""),
    })


def preflight(args: argparse.Namespace) -> tuple[ServeOptions, str]:
    """(options, the version the alias names now); PreflightError on any bad input."""
    try:
        options = _options(args)
    except (ValueError, TypeError) as err:
        raise PreflightError(str(err)) from None
    if not 0 < args.port < 65536:
        raise PreflightError(f"--port {args.port} is not a TCP port")
    if args.videos and not os.path.isdir(args.videos):
        raise PreflightError(f"--videos {args.videos}: not a directory")
    check_tracking()
    if options.data:
        require_manifest(options.data, "served")
    try:
        return options, ModelRef.parse(options.model).resolve()
    except ModelResolutionError as err:
        raise PreflightError(str(err)) from None


def _start_failure(name: str) -> str | None:
    """The replica's one-line reason, from Serve's status of application `name`."""
    app = serve.status().applications.get(name)
    texts = [app.message] if app else []
    texts += [d.message for d in (app.deployments.values() if app else [])]
    for text in texts:
        for line in (text or "").splitlines():
            if START_FAILED in line:
                return line[line.index(START_FAILED):]
    return None


def _ray_address() -> str | None:
    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):
        raise PreflightError(
            f"RAY_ADDRESS={address} is the job API; a Serve driver needs the GCS address "
            "(host:port, the `gcs_address` of `python -m cluster.local.stack status`), or "
            "submit this command with `ray job submit`")
    return address or None


def deploy(args: argparse.Namespace, options: ServeOptions, log: Any = print) -> int:
    """Deploy and block until a signal; returns the exit code."""
    address = _ray_address()
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as err:
        raise PreflightError(f"cannot connect to the Ray cluster at {address}: "
                             f"{str(err).splitlines()[0]}") from None
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": args.host, "port": args.port})
    t0 = time.monotonic()
    try:
        serve.run(build(dataclasses.asdict(options)), name=args.name,
                  route_prefix=args.route_prefix)
    except RuntimeError as err:
        reason = _start_failure(args.name) or str(err).splitlines()[0]
        print(f"jobs.serve: {reason}", file=sys.stderr, flush=True)
        _teardown(args.name)
        return EXIT_START_FAILED
    prefix = args.route_prefix.rstrip("/")
    log(f"serving {options.model} on http://{args.host}:{args.port}{prefix}/ (ready in "
        f"{time.monotonic() - t0:.1f} s): POST {prefix}/v1/predict, GET {prefix}/v1/model"
        + (f", page at {prefix}/" if options.data else ""))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log("stopping ...")
    _teardown(args.name)
    return 0


def _teardown(name: str) -> None:
    """Delete our application; shut Serve down if nothing else runs on it."""
    serve.delete(name)
    if not serve.status().applications:
        serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = build_parser().parse_args(argv)
    try:
        options, version = preflight(args)
        print(f"jobs.serve: {options.model} is version {version}", flush=True)
        return deploy(args, options)
    except PreflightError as err:
        print(f"jobs.serve: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
