"""Weights-only initialisation (pretrain -> fine-tune): sources, the mismatch error, and the
first fine-tuning loss equal to the pretrained model's loss on the same batch."""

from __future__ import annotations

import copy
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from vl import serving, tracking
from vl.checkpoint import (
    CheckpointMismatchError,
    UnsafeCheckpointError,
    complete_checkpoints,
    load_weights,
    prune_checkpoints,
    read_seal,
    read_weights,
    restore_training_state,
    seal_checkpoint,
    seed_everything,
    write_training_state,
)
from vl.config import ExperimentConfig
from vl.engine import build_optimizer, forward, train_step
from vl.losses import build_criterion
from vl.model import build_model
from vl.storage import filesystem
from vl.testing import random_batch


def tiny_cfg(**model_overrides) -> ExperimentConfig:
    """The tiny preset with every dropout off, so train-mode losses are deterministic."""
    overrides = ["model.dropout=0", "model.attention_dropout=0", "model.input_dropout=0",
                 "data.dataset=pretrain", "loss.al_coef=0.01"]
    overrides += [f"model.{k}={v}" for k, v in model_overrides.items()]
    return ExperimentConfig.from_preset("tiny", overrides)


def batch_for(cfg: ExperimentConfig, seed: int):
    # two video sets summing to model.video_dim, one text set of model.text_dim
    half = cfg.model.video_dim // 2
    return random_batch(4, 12, 8, [half, cfg.model.video_dim - half], [cfg.model.text_dim],
                        seed=seed)


def loss_on(model, criterion, batch) -> float:
    with torch.no_grad():
        return float(criterion(forward(model, batch), batch, 0)["loss"])


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pretrained():
    """A tiny model after a few pretraining steps (weights away from any fresh init)."""
    cfg = tiny_cfg()
    torch.manual_seed(1)
    model = build_model(cfg.model)
    criterion = build_criterion(cfg.loss)
    optimizer, _ = build_optimizer(model, cfg.train)
    for step in range(3):
        train_step(model, criterion, batch_for(cfg, 100 + step), optimizer, epoch=step)
    return cfg, model


def test_fine_tune_starts_from_the_pretrained_weights(pretrained, tmp_path):
    cfg, pre = pretrained
    path = tmp_path / "model.pt"  # the layout jobs.train writes: weights + config + epoch
    torch.save({"model": pre.state_dict(), "config": cfg.to_dict(), "epoch": 49}, path)
    batch = batch_for(cfg, 7)
    criterion = build_criterion(cfg.loss)
    pre.train()
    expected = loss_on(pre, criterion, batch)

    torch.manual_seed(2)  # a different initialisation than the pretrained model's
    fine = build_model(cfg.model)
    fresh_loss = loss_on(fine.train(), criterion, batch)
    load_weights(fine, path)
    optimizer, scheduler = build_optimizer(fine, cfg.train)  # fresh: no state, epoch 0
    assert optimizer.state_dict()["state"] == {} and scheduler.last_epoch == 0
    first = train_step(fine, criterion, batch, optimizer, epoch=0)["loss"]
    assert float(first) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert abs(fresh_loss - expected) > 1e-3  # the test would notice weights not loaded
    # and the step did update the fine-tuned copy, not the source
    assert loss_on(fine, criterion, batch) != pytest.approx(expected, rel=1e-6)


def test_sources_file_directory_bare_and_ddp_prefixed(pretrained, tmp_path):
    cfg, pre = pretrained
    state = pre.state_dict()
    (tmp_path / "ckpt").mkdir()
    torch.save({"model": state, "optimizer": {"state": {}}, "epoch": 3},
               tmp_path / "ckpt" / "state.pt")  # directory with only state.pt
    torch.save(state, tmp_path / "bare.pt")
    sources = [tmp_path / "ckpt", str(tmp_path / "bare.pt"),
               {"module." + k: v for k, v in state.items()}, {"model": state}]
    for source in sources:
        torch.manual_seed(5)
        model = build_model(cfg.model)
        load_weights(model, source)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), (source, k)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_weights(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither model.pt nor state.pt"):
        read_weights(tmp_path / "empty")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        read_weights(tmp_path / "junk.pt")


def test_mismatch_names_every_tensor(pretrained):
    cfg, pre = pretrained
    state = copy.copy(pre.state_dict())
    state["extra.weight"] = torch.zeros(3)
    dropped = sorted(state)[0]
    del state[dropped]
    other = tiny_cfg(video_dim=cfg.model.video_dim + 4)  # another feature set width
    model = build_model(other.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(model, {"model": state})
    err = info.value
    assert err.missing == [dropped] and err.unexpected == ["extra.weight"]
    # every tensor whose shape depends on the video width is named with both shapes
    want = {k for k, v in model.state_dict().items()
            if k in state and tuple(v.shape) != tuple(state[k].shape)}
    assert want and {k for k, _, _ in err.shapes} == want
    text = str(err)
    for k, a, b in err.shapes:
        assert f"{k}: {a} vs {b}" in text
    assert dropped in text and "extra.weight" in text
    # nothing was loaded
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_s3_and_registered_model_sources(pretrained, s3_env, tmp_path, monkeypatch):
    """s3:// checkpoint folders and `models:/NAME@champion` (registry on a local SQLite store)."""

    cfg, pre = pretrained
    local = tmp_path / "model.pt"
    torch.save({"model": pre.state_dict(), "config": cfg.to_dict(), "epoch": 0}, local)
    fs, root = filesystem("s3://vl-runs/ckpt-test/run1/checkpoint_000001")
    fs.put_file(str(local), f"{root}/model.pt")
    torch.manual_seed(9)
    model = build_model(cfg.model)
    load_weights(model, "s3://vl-runs/ckpt-test/run1/checkpoint_000001")
    assert all(torch.equal(v, pre.state_dict()[k]) for k, v in model.state_dict().items())

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        MlflowClient().create_experiment("pretrain", artifact_location=(tmp_path / "art").as_uri())
        run_id = tracking.start_or_resume_run("pretrain", "pre-1")
        version, champion = serving.log_and_register_model(
            run_id, local, "vl-pretrained", "MR-full-R1_at_0.5", 50.0)
        assert champion
        tracking.finish_run(run_id)
        torch.manual_seed(10)
        model = build_model(cfg.model)
        load_weights(model, "models:/vl-pretrained@champion")
        assert all(torch.equal(v, pre.state_dict()[k]) for k, v in model.state_dict().items())
        with pytest.raises(FileNotFoundError, match="vl-missing"):
            load_weights(model, "models:/vl-missing@champion")
    finally:
        mlflow.set_tracking_uri(None)


def test_pretrain_and_finetune_configs_build_the_same_network():
    """configs/pretrain.yaml -> configs/qvhighlights_finetune.yaml: the paper's coefficients and a
    checkpoint of the first loads into the second."""
    root = Path(__file__).resolve().parents[1] / "configs"
    pre = ExperimentConfig.from_yaml(root / "pretrain.yaml")
    fine = ExperimentConfig.from_yaml(root / "qvhighlights_finetune.yaml")
    assert (pre.data.batch_size, pre.loss.al_coef, pre.data.dataset) == (256, 0.01, "pretrain")
    assert (fine.loss.al_coef, fine.loss.tcl_coef, fine.loss.hl_coef, fine.loss.scsl_coef) == (
        0.8, 1.0, 10.0, 1.0)
    assert fine.data.dataset == "qvhighlights"
    assert (pre.data.video_features, pre.data.text_features) == (
        fine.data.video_features, fine.data.text_features)
    torch.manual_seed(0)
    source = build_model(pre.model)
    target = build_model(fine.model)
    load_weights(target, {"model": source.state_dict()})
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())


def test_training_state_resumes_the_same_run(tmp_path):
    """write_training_state + restore_training_state: a fresh process continues exactly where
    the run stopped (weights, AdamW moments, schedule and the RNG stream that dropout draws)."""
    cfg = ExperimentConfig.from_preset("tiny")  # dropout on: the RNG state matters
    criterion = build_criterion(cfg.loss)
    batch = batch_for(cfg, 7)
    seed_everything(3)
    model = build_model(cfg.model)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    train_step(model, criterion, batch, optimizer, epoch=0)
    scheduler.step()
    write_training_state(tmp_path, model, optimizer, scheduler, 0, best={"value": 1.5})
    expected = float(train_step(model, criterion, batch, optimizer, epoch=1)["loss"])

    seed_everything(99)  # a fresh start elsewhere: everything must come from the state file
    resumed = build_model(cfg.model)
    opt2, sched2 = build_optimizer(resumed, cfg.train)
    state = restore_training_state(tmp_path, resumed, opt2, sched2)
    assert state["epoch"] == 0 and state["best"] == {"value": 1.5}
    assert sched2.last_epoch == scheduler.last_epoch
    assert float(train_step(resumed, criterion, batch, opt2, epoch=1)["loss"]) == expected


class _Payload:
    """Unpickling this object creates its marker file: the stand-in for code planted in storage."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_payload_is_refused_and_never_runs(tmp_path):
    """A state.pt whose unpickling would run code: refused with a clear error, nothing runs."""
    cfg = ExperimentConfig.from_preset("tiny")
    model = build_model(cfg.model)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    marker = tmp_path / "payload-ran"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": 0, "rng": {},
                "history": _Payload(marker)}, tmp_path / "state.pt")  # fmt: skip
    with pytest.raises(UnsafeCheckpointError, match=r"state\.pt: refused"):
        restore_training_state(tmp_path, model, optimizer, scheduler)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        read_weights(tmp_path / "state.pt")
    assert not marker.exists()


def test_training_state_is_plain_data(tmp_path):
    """What write_training_state writes loads weights-only (tensors and plain containers)."""
    cfg = ExperimentConfig.from_preset("tiny")
    model = build_model(cfg.model)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    write_training_state(tmp_path, model, optimizer, scheduler, 2, global_step=7,
                         history={"train_loss": [1.0, 0.5]}, best={"value": 0.5})  # fmt: skip
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["history"] == {"train_loss": [1.0, 0.5]}


def test_a_resume_finds_the_newest_complete_checkpoint_and_prunes_the_rest(tmp_path):
    """complete_checkpoints reads storage alone: a sealed folder counts only while every file
    its seal lists is there with its size (a half-uploaded one is skipped), the newest by
    epoch comes last, and prune_checkpoints removes every folder outside the kept set."""
    run = tmp_path / "run"
    for name, epoch in (("checkpoint_a", 1), ("checkpoint_b", 3), ("checkpoint_c", 5)):
        folder = run / name
        folder.mkdir(parents=True)
        (folder / "state.pt").write_bytes(b"x" * (10 + epoch))
        (folder / "model.pt").write_bytes(b"y" * 7)
        seal_checkpoint(folder, epoch, 10 * epoch)
    (run / "checkpoint_c" / "model.pt").write_bytes(b"y" * 3)  # an upload cut short
    (run / "checkpoint_d").mkdir()  # an upload that never got to its seal
    (run / "checkpoint_d" / "state.pt").write_bytes(b"z")
    (run / "run_record.json").write_text("{}")

    found = complete_checkpoints(str(run))
    assert [(name, seal["epoch"], seal["global_step"]) for name, seal in found] == [
        ("checkpoint_a", 1, 10), ("checkpoint_b", 3, 30)]
    assert read_seal(str(run / "checkpoint_c")) is None
    assert read_seal(str(run / "checkpoint_d")) is None

    removed = prune_checkpoints(str(run), {"checkpoint_b"})
    assert removed == ["checkpoint_a", "checkpoint_c", "checkpoint_d"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_b", "run_record.json"]
