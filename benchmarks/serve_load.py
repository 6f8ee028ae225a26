"""Throughput and latency of `jobs.serve` under bounded concurrent clients on loopback.

`python -m benchmarks.serve_load [--clients 1,8,32] [--requests 400]` prints one JSON object.
Without `--url` it brings up its own local stack (S3, MLflow, a 2-CPU Ray head), registers a
randomly initialised smoke-size model (configs/smoke.yaml: width 64, 10 queries; 16+2 video
and 8 text dims) and starts `python -m jobs.serve` on it; with `--url` it loads a server that
is already running. Each level runs `--requests` POST /v1/predict calls (one 75-clip sample
each, 10 query tokens) from that many client threads, each on its own keep-alive connection,
after a warm-up of 2 requests per client; it reports requests/s, p50 and p99 latency, and the
1-minute load average before and after (the machine is shared: read the figures with it).
Batching (`@serve.batch`) is what lets many clients share one forward pass;
`--max-batch-size 1` measures the same server without it.

Measured on the 2-core development machine, other agents keeping the 1-min load average at
11-14 (defaults): 1 client 46.7 req/s (p50 20 ms, p99 55 ms); 8 clients 133.7 (p99 127 ms);
32 clients 177.4 req/s = 3.8x, p99 405 ms. Runs at load 12-15 gave 2.7-4.6x at 32 clients;
one 1-CPU replica 2.3-3.0x (one forward pass at a time); `--max-batch-size 1`: 25 req/s and
a 2.5 s p99 at 32 clients.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import numpy as np

from cluster.local.common import free_port, quiet_env, wait_for
from cluster.local.stack import LocalStack

REPO = Path(__file__).resolve().parents[1]


def payload(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return json.dumps({"video_features": [rng.normal(size=(75, 18)).round(4).tolist()],
                       "text_features": [rng.normal(size=(10, 8)).round(4).tolist()]}).encode()


def run_level(url: str, clients: int, requests: int, body: bytes) -> dict:
    """`requests` calls from `clients` threads; latencies in ms, wall-clock throughput."""
    parsed = urllib.parse.urlsplit(url)
    remaining = [requests]
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[int] = []

    def worker(warmup: int) -> None:
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
        headers = {"Content-Type": "application/json"}
        for _ in range(warmup):
            conn.request("POST", "/v1/predict", body, headers)
            conn.getresponse().read()
        barrier.wait()
        while True:
            with lock:
                if remaining[0] == 0:
                    break
                remaining[0] -= 1
            t0 = time.perf_counter()
            conn.request("POST", "/v1/predict", body, headers)
            response = conn.getresponse()
            response.read()
            elapsed = (time.perf_counter() - t0) * 1000
            with lock:
                latencies.append(elapsed)
                if response.status != 200:
                    errors.append(response.status)
        conn.close()

    barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=worker, args=(2,)) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"requests": len(latencies), "errors": len(errors), "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(q[49], 1), "p99_ms": round(q[98], 1)}


def register_smoke_model(name: str, tmp: Path) -> None:
    """A randomly initialised smoke-size model, registered as NAME@champion."""
    import torch

    from vl import serving, tracking
    from vl.config import ExperimentConfig
    from vl.model import build_model

    cfg = ExperimentConfig.from_yaml(REPO / "configs/smoke.yaml",
                                     ["model.video_dim=16", "model.text_dim=8"])
    torch.manual_seed(0)
    path = tmp / "model.pt"
    torch.save({"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict(),
                "epoch": 0}, path)
    run_id = tracking.start_or_resume_run("bench-serve", name)
    serving.log_and_register_model(run_id, path, name, "selection", 1.0)
    tracking.finish_run(run_id)


def start_server(stack: LocalStack, args: argparse.Namespace, tmp: Path
                 ) -> tuple[str, subprocess.Popen]:
    env = quiet_env({**stack.env(), "RAY_ADDRESS": stack.ray.gcs_address})
    os.environ.update({k: v for k, v in env.items() if k.startswith(("MLFLOW", "AWS"))})
    name = f"bench-serve-{uuid.uuid4().hex[:6]}"
    with contextlib.redirect_stdout(sys.stderr):  # MLflow prints run links; stdout is JSON
        register_smoke_model(name, tmp)
    port = free_port()
    log = tmp / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.serve", "--model", f"models:/{name}@champion",
             "--port", str(port), "--replicas", str(args.replicas), "--num-cpus",
             str(args.num_cpus), "--max-batch-size", str(args.max_batch_size),
             "--batch-wait-s", str(args.batch_wait_s)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"jobs.serve exited {proc.returncode}:\n{log.read_text()}")
        return "serving models:/" in log.read_text()

    wait_for(up, 240, "jobs.serve")
    return f"http://127.0.0.1:{port}", proc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="", help="an already running jobs.serve (default: start "
                                             "a local stack and a server)")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    p.add_argument("--requests", type=int, default=400, help="requests per level")
    # Two half-CPU replicas on the 2-CPU head: two forward passes run at once, and the
    # proxy and the clients keep a share of the cores.
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per replica")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-s", type=float, default=0.005)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    body = payload()
    with tempfile.TemporaryDirectory(prefix="vl-bench-serve-") as tmp:
        stack = proc = None
        try:
            url = args.url
            if not url:
                stack = LocalStack.start(Path(tmp) / "stack", progress=lambda m: print(
                    m, file=sys.stderr, flush=True))
                url, proc = start_server(stack, args, Path(tmp))
            load_before = os.getloadavg()[0]
            results = {str(c): run_level(url, c, args.requests, body) for c in levels}
            load_after = os.getloadavg()[0]
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
            if stack is not None:
                stack.stop()
    base = results[str(levels[0])]["requests_per_s"]
    print(json.dumps({
        "levels": results,
        "throughput_vs_first_level": {c: round(r["requests_per_s"] / base, 2)
                                      for c, r in results.items()},
        "load_avg_1min": {"before": round(load_before, 2), "after": round(load_after, 2)},
        "cpus": os.cpu_count(),
        "server": {"replicas": args.replicas, "num_cpus": args.num_cpus,
                   "max_batch_size": args.max_batch_size, "batch_wait_s": args.batch_wait_s},
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
