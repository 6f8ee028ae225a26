"""Wall time of the full QVHighlights metric set on the 1550-query val file.

`python -m benchmarks.eval [--runs N]` prints one JSON line. It writes a model-like prediction
file for ../shared/data/highlight_val_release.jsonl (10 scored windows around the GT windows,
75-ish saliency scores with float16-like ties, seeded), then times:
- the whole command `python -m vl.eval qvhighlights --submission ... --gt ... --out ...` as a
  subprocess (interpreter start, imports, JSON parsing, metrics, writing): min and median wall,
  and its CPU time (user + sys), since a shared machine inflates wall time;
- `python -c "import numpy"` the same way (the floor any NumPy command pays);
- in-process: loading both files and `evaluate_qvhighlights` separately (min over runs).
The official `standalone_eval` needs about 8 s wall for the same set (EVAL_SPEC.md);
`speedup_vs_official` divides that by the command's median wall.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cluster.local.common import quiet_env
from vl.metrics import evaluate_qvhighlights, load_jsonl

REPO = Path(__file__).resolve().parents[1]
VAL = REPO / ".." / "shared" / "data" / "highlight_val_release.jsonl"
OFFICIAL_WALL_S = 8.0  # EVAL_SPEC.md: the official script on these machines (8-process pools)


def write_predictions(gt_rows: list[dict], path: Path, seed: int = 0) -> None:
    """Model-like predictions: noisy copies of GT windows, scores rounded to 4 decimals."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for row in gt_rows:
            duration = float(row["duration"])
            gt = np.array(row["relevant_windows"], dtype=float)
            pick = gt[rng.integers(0, len(gt), size=10)]
            st = np.clip(pick[:, 0] + rng.normal(0, 3, 10), 0, duration)
            ed = np.clip(pick[:, 1] + rng.normal(0, 3, 10), 0, duration)
            st, ed = np.minimum(st, ed), np.maximum(st, ed)
            score = np.sort(rng.random(10))[::-1]
            windows = [[round(float(a), 4), round(float(b), 4), round(float(c), 4)]
                       for a, b, c in zip(st, ed, score, strict=True)]
            n = int(duration / 2)
            sal = rng.normal(0, 1, n)
            sal[np.array(row["relevant_clip_ids"])] += np.mean(row["saliency_scores"], axis=1)
            sal = sal.astype(np.float16).astype(float)  # the reference emits .half() scores
            f.write(json.dumps({"qid": row["qid"], "query": row["query"], "vid": row["vid"],
                                "pred_relevant_windows": windows,
                                "pred_saliency_scores": sal.tolist()}) + "\n")


def time_command(cmd: list[str], runs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + sys of the child) seconds of `runs` executions."""
    walls, cpus = [], []
    env = quiet_env({"PYTHONPATH": str(REPO)})
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return walls, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    if not VAL.exists():
        print(json.dumps({"benchmark": "eval_qvhighlights", "skipped": f"{VAL} is absent"}))
        return
    load_avg = os.getloadavg()[0]
    gt_rows, _ = load_jsonl(VAL)
    with tempfile.TemporaryDirectory(prefix="vl-eval-bench-") as tmp:
        pred = Path(tmp) / "pred.jsonl"
        out = Path(tmp) / "metrics.json"
        write_predictions(gt_rows, pred)
        cmd = [sys.executable, "-m", "vl.eval", "qvhighlights", "--submission", str(pred),
               "--gt", str(VAL), "--out", str(out)]
        walls, cpus = time_command(cmd, args.runs)
        numpy_walls, _ = time_command([sys.executable, "-c", "import numpy"], args.runs)
        brief = json.loads(out.read_text())["brief"]
        loads, evals = [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            sub, _ = load_jsonl(pred)
            gt, _ = load_jsonl(VAL)
            t1 = time.perf_counter()
            evaluate_qvhighlights(sub, gt)
            loads.append(t1 - t0)
            evals.append(time.perf_counter() - t1)
    median_wall = statistics.median(walls)
    print(json.dumps({
        "benchmark": "eval_qvhighlights",
        "queries": len(gt_rows),
        "runs": args.runs,
        "cli_wall_s_min": round(min(walls), 3),
        "cli_wall_s_median": round(median_wall, 3),
        "cli_cpu_s_median": round(statistics.median(cpus), 3),
        "numpy_import_wall_s_min": round(min(numpy_walls), 3),
        "inprocess_load_s_min": round(min(loads), 3),
        "inprocess_metrics_s_min": round(min(evals), 3),
        "official_wall_s": OFFICIAL_WALL_S,
        "speedup_vs_official": round(OFFICIAL_WALL_S / median_wall, 1),
        "load_avg_1m": round(load_avg, 2),
        "cpu_count": os.cpu_count(),
        "brief_MR-full-mAP": brief["MR-full-mAP"],
        "brief_HL-min-VeryGood-mAP": brief["HL-min-VeryGood-mAP"],
    }))


if __name__ == "__main__":
    main()
