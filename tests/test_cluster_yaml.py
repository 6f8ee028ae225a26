"""The cluster configs parse, and carry what a real submission depends on."""

from __future__ import annotations

from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
QUIET = {"RAY_USAGE_STATS_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"}


def test_aws_launcher_config():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    nodes = cfg["available_node_types"]
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in nodes
    gpu_types = {n["node_config"]["InstanceType"] for k, n in nodes.items() if k != "head"}
    assert gpu_types and all(t.startswith(("g5.", "g6.", "p4", "p5")) for t in gpu_types)
    setup = "\n".join(cfg["setup_commands"])
    for pin in ("torch==2.13.0", "ray[default,train,tune]==2.60.0", "mlflow==3.17.2",
                "s3fs==2026.9.0", "pyarrow==25.0.1"):
        assert pin in setup, pin
    assert all(f"export {name}=" in setup for name in QUIET)
    assert "RAY_AUTH_MODE=token" in setup
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("--disable-usage-stats" in c for c in starts if c.strip().startswith("ulimit"))


def test_kuberay_rayjob():
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "jobs.train"]
    for flag in ("--config", "--data", "--storage", "--register-as"):
        assert flag in entry, flag
    assert entry[entry.index("--data") + 1].startswith("s3://")
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["authOptions"]["mode"] == "token"
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for group in pods:
        (container,) = group["template"]["spec"]["containers"]
        assert {e["name"] for e in container["env"]} >= QUIET
        assert container["envFrom"][0]["secretRef"]["name"] == "videolights-env"
    (gpu,) = cluster["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"] == "1"
