"""`make demo`: the whole product on this machine, end to end, in about ten minutes.

1. start the local stack (S3 server, MLflow server, Ray head on 127.0.0.1);
2. generate a synthetic QVHighlights-shaped dataset (planted signal, small feature dims);
3. shard it to the local S3 with jobs.shard;
4. `ray job submit` the smoke training (2 Ray workers, DDP, checkpoints on S3, MLflow run,
   best checkpoint registered as `videolights-demo`);
5. print the MLflow run URL, the best evaluation's metrics and the registered version with its
   `champion` alias; then stop the stack (`--keep` leaves it running for a look around).

    python -m cluster.local.demo [--keep] [--dir DIR] [--videos N] [--data-seed S]
        [--set KEY=VALUE ...]        # e.g. --set train.seed=1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from cluster.local.common import WORKING_DIR_EXCLUDES
from cluster.local.stack import ENV_FILE, STATE_FILE, LocalStack, write_state
from jobs.shard import run as shard_run
from vl.data.synthetic import SyntheticConfig, generate

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/smoke.yaml"
MODEL_NAME = "videolights-demo"
RUN_NAME = "demo"
DATA_PREFIX = "s3://vl-data/demo/qvhighlights"
STORAGE = "s3://vl-runs/demo"
# Small feature dims keep the demo fast; the planted signal does not depend on them.
VIDEO_SETS = ("slowfast", "clip")
TEXT_SETS = ("clip",)
DIMS = {"slowfast": 16, "clip": 16}
DEFAULT_VIDEOS = 1000  # 2 queries each: 1,600 train / 400 held-out val queries
# Lines of `ray job submit` output that say nothing to a demo viewer.
_NOISE = ("INFO packaging.py", "WARNING working_dir.py", "INFO dashboard_sdk.py",
          "Ignoring upload", "INFO cli.py", "-- \x1b[32m---", "SUCC cli.py:66", "SUCC cli.py:68")


def step(message: str, t0: float) -> None:
    print(f"[demo {time.monotonic() - t0:6.1f} s] {message}", flush=True)


def generate_and_shard(root: Path, videos: int, env: dict[str, str], t0: float,
                       data_seed: int = 0) -> None:
    """Synthetic official layout under root/raw, then train/ and val/ shard sets on S3."""
    step(f"generating a synthetic QVHighlights-shaped dataset ({videos} videos, dims {DIMS}) "
         f"= python -m vl.data.synthetic --dataset qvhighlights --videos {videos} "
         f"--seed {data_seed} ...", t0)
    layout = generate(SyntheticConfig("qvhighlights", videos=videos, seed=data_seed, dims=DIMS,
                                      video_sets=VIDEO_SETS, text_sets=TEXT_SETS),
                      root / "raw")
    step(f"  {layout.num_train} train / {layout.num_val} val queries in {layout.root}", t0)
    saved = dict(os.environ)
    os.environ.update(env)  # jobs.shard reads the S3 endpoint and keys from the environment
    try:
        for split, jsonl in (("train", layout.train_jsonl), ("val", layout.val_jsonl)):
            out = f"{DATA_PREFIX}/{split}"
            step(f"sharding {split} -> {out} (python -m jobs.shard --out {out} ...)", t0)
            shard_run(dataset="qvhighlights", annotations=str(jsonl),
                      video_features=layout.video_arg(), text_features=layout.text_arg(),
                      out=out, rows_per_shard=100, ray_mode="off", log=lambda *_: None)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def submit_training(env: dict[str, str], overrides: list[str], t0: float) -> dict:
    """`ray job submit` the smoke training; stream its log; return the job's RESULT summary."""
    runtime_env = json.dumps({"excludes": WORKING_DIR_EXCLUDES})
    # The local head's PATH need not hold this venv: name its interpreter explicitly.
    entrypoint = [sys.executable, "-m", "jobs.train", "--config", CONFIG, "--data", DATA_PREFIX,
                  "--storage", STORAGE, "--name", RUN_NAME, "--register-as", MODEL_NAME]
    for item in overrides:
        entrypoint += ["--set", item]
    command = [shutil.which("ray", path=env["PATH"]) or "ray", "job", "submit",
               "--address", env["RAY_ADDRESS"], "--working-dir", ".",
               "--entrypoint-num-cpus", "0", "--runtime-env-json", runtime_env, "--",
               *entrypoint]
    step("submitting: " + shlex.join(["ray", *command[1:]]), t0)
    summary: dict = {}
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("RESULT "):
                summary = json.loads(line[len("RESULT "):])
                continue
            if any(noise in line for noise in _NOISE):
                continue
            print(f"  | {line.rstrip()}", flush=True)
        code = proc.wait()
    if code != 0:
        raise SystemExit(f"demo: the training job failed (exit {code}); see the log above")
    return summary


def report(summary: dict, env: dict[str, str], t0: float) -> None:
    """MLflow URL, the best evaluation's metrics, the registered version and its alias."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ[key] = env[key]
    client = MlflowClient()
    run = client.get_run(summary["mlflow_run_id"])
    uri = env["MLFLOW_TRACKING_URI"]
    step("done", t0)
    print(f"\nMLflow run:      {uri}/#/experiments/{run.info.experiment_id}/runs/"
          f"{run.info.run_id}", flush=True)
    print(f"checkpoints:     {summary.get('checkpoints')} (best: {summary.get('best_checkpoint')})")
    metrics = summary.get("metrics", {})
    print(f"\nbest evaluation (epoch {summary.get('best_epoch', -1) + 1}, held-out queries):")
    keys = ["MR-full-R1_at_0.5", "MR-full-R1_at_0.7", "MR-full-mAP", "MR-full-mIoU",
            "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1"]
    for key in keys:
        if key in metrics:
            print(f"  {key.replace('_at_', '@'):24s} {metrics[key]:7.2f}")
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    aliases = ", ".join(version.aliases) or "-"
    print(f"\nregistered model: {MODEL_NAME} version {summary.get('version')} "
          f"(this run; champion {'moved to it' if summary.get('champion') else 'unchanged'}); "
          f"models:/{MODEL_NAME}@champion = version {version.version} [aliases: {aliases}]")
    print(f"predict with:     python -m jobs.predict --model models:/{MODEL_NAME}@champion "
          f"--data {DATA_PREFIX}/val --out predictions.jsonl --gt", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local.demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true",
                        help="leave the stack running at the end (stop it with "
                             "python -m cluster.local.stack down --dir DIR)")
    parser.add_argument("--dir", type=Path,
                        help="stack + data directory (default: a fresh temp dir, removed "
                             "unless --keep)")
    parser.add_argument("--videos", type=int, default=DEFAULT_VIDEOS)
    parser.add_argument("--data-seed", type=int, default=0,
                        help="seed of the synthetic data set (its concepts and videos)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override passed to jobs.train")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    root = args.dir or Path(tempfile.mkdtemp(prefix="vl-demo-"))
    step(f"starting the local stack in {root}", t0)
    stack = LocalStack.start(root, num_cpus=2, progress=lambda m: step(m.strip(), t0))
    ok = False
    try:
        write_state(stack)
        env = {**os.environ, **stack.env()}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        generate_and_shard(root, args.videos, env, t0, args.data_seed)
        summary = submit_training(env, args.overrides, t0)
        report(summary, env, t0)
        ok = True
    finally:
        if args.keep:
            print(f"\nstack left running (--keep): source {root / ENV_FILE}; stop it with "
                  f"python -m cluster.local.stack down --dir {root}", flush=True)
        else:
            step("stopping the local stack", t0)
            stack.stop()
            (root / STATE_FILE).unlink(missing_ok=True)
            if args.dir is None:
                shutil.rmtree(root, ignore_errors=True)
            step(f"stack stopped; demo {'finished' if ok else 'FAILED'}", t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
