"""Config loading: presets, YAML files, dotted overrides, and errors that name key and file."""

from __future__ import annotations

import pytest

from vl.config import ConfigError, ExperimentConfig, apply_overrides, apply_values


def test_paper_preset_matches_the_paper():
    cfg = ExperimentConfig.from_preset("paper")
    m = cfg.model
    assert (m.hidden_dim, m.nheads, m.bicmf_layers, m.enc_layers, m.dec_layers) == (256, 8, 2, 3, 3)
    assert m.num_queries == 10
    assert m.video_dim == 2304 + 512 + 768 and m.video_input_dim == 3586
    assert m.text_dim == 512 + 768
    assert cfg.data.video_features == ["slowfast", "clip", "blip"]


def test_reference_script_preset():
    cfg = ExperimentConfig.from_preset("reference_script")
    assert cfg.model.bicmf_layers == 1
    assert cfg.model.video_dim == 2304 + 512 and cfg.model.text_dim == 512
    assert cfg.data.text_features == ["clip"]


def test_yaml_with_preset_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("preset: tiny\nname: x\nmodel:\n  bicmf_layers: 2\ntrain:\n  epochs: 7\n"
                    "  lr: 1e-3\n")
    cfg = ExperimentConfig.from_yaml(path, ["loss.hl_coef=5", "data.video_features=[clip]"])
    assert cfg.name == "x" and cfg.model.bicmf_layers == 2 and cfg.train.epochs == 7
    assert cfg.train.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string; accepted for float fields
    assert cfg.loss.hl_coef == 5.0 and isinstance(cfg.loss.hl_coef, float)
    assert cfg.data.video_features == ["clip"]
    assert cfg.model.hidden_dim == 32  # from the tiny preset
    again = ExperimentConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("preset: tiny\nmodel:\n  bicfm_layers: 1\n")
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_yaml(path)
    msg = str(err.value)
    assert str(path) in msg and "model.bicfm_layers" in msg and "bicmf_layers" in msg


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="model.nheads.*integer"):
        ExperimentConfig.from_preset("tiny", ["model.nheads=four"])
    with pytest.raises(ConfigError, match="train.bf16"):
        ExperimentConfig.from_preset("tiny", ["train.bf16=3"])


def test_impossible_values_are_errors():
    with pytest.raises(ConfigError, match="model.hidden_dim.*divisible"):
        ExperimentConfig.from_preset("tiny", ["model.hidden_dim=30"])
    with pytest.raises(ConfigError, match="data.dataset"):
        ExperimentConfig.from_preset("tiny", ["data.dataset=youtube"])
    with pytest.raises(ConfigError, match="data.video_features"):
        ExperimentConfig.from_preset("tiny", ["data.video_features=[resnet]"])
    with pytest.raises(ConfigError, match="model.dropout"):
        ExperimentConfig.from_preset("tiny", ["model.dropout=1.5"])


def test_unknown_preset_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="preset"):
        ExperimentConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        ExperimentConfig.from_preset("tiny", ["model.hidden_dim"])


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        ExperimentConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ExperimentConfig.from_yaml(bad)


@pytest.mark.parametrize(("old", "new"), [
    ("data.num_workers", "data.loader_workers"),
    ("train.num_workers", "scale.num_workers"),
    ("train.cpus_per_worker", "scale.cpus_per_worker"),
    ("train.fail_at_step", "scale.fail_at_step"),
])
def test_moved_keys_fail_naming_the_new_key(tmp_path, old, new):
    section, key = old.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"preset: tiny\n{section}:\n  {key}: 1\n")
    with pytest.raises(ConfigError, match=f"'{old}' is now '{new}'") as err:
        ExperimentConfig.from_yaml(path)
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match=f"is now '{new}'"):
        ExperimentConfig.from_preset("tiny", [f"{old}=1"])
    moved = ExperimentConfig.from_preset("tiny", [f"{new}=1"])
    assert getattr(getattr(moved, new.split(".")[0]), new.split(".")[1]) == 1


def test_apply_values_sets_dotted_paths_like_set():
    raw = {"preset": "tiny", "loss": {"hl_coef": 1.0}}
    by_value = apply_values(raw, {"loss.hl_coef": 5.0, "train.seed": 3})
    assert by_value == apply_overrides(raw, ["loss.hl_coef=5.0", "train.seed=3"], "test")
    assert raw["loss"]["hl_coef"] == 1.0  # the input is not modified
    cfg = ExperimentConfig.from_dict(by_value)
    assert (cfg.loss.hl_coef, cfg.train.seed) == (5.0, 3)


@pytest.mark.parametrize("override,key", [
    ("train.lr=nan", "train.lr"), ("train.lr=.inf", "train.lr"), ("train.lr=0", "train.lr"),
    ("train.lr_drop=0", "train.lr_drop"), ("data.batch_size=-4", "data.batch_size"),
    ("data.eval_batch_size=0", "data.eval_batch_size"),
    ("scale.cpus_per_worker=0", "scale.cpus_per_worker"),
])
def test_impossible_training_values_name_their_key(override, key):
    """NaN / zero lr, lr_drop=0 (a ZeroDivisionError inside StepLR otherwise) and non-positive
    batch sizes are refused at load time, naming the key."""
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        ExperimentConfig.from_preset("tiny", [override])


def test_compile_needs_static_shapes():
    """A compiled model with batch-maximum shapes would recompile for every new length."""
    with pytest.raises(ConfigError, match="key 'train.compile'.*data.static_shapes"):
        ExperimentConfig.from_preset("tiny", ["train.compile=true"])
    cfg = ExperimentConfig.from_preset("tiny", ["train.compile=true", "data.static_shapes=true"])
    assert cfg.data.static_shape() == (cfg.data.max_v_l, cfg.data.max_q_l)
    assert ExperimentConfig.from_preset("tiny", []).data.static_shape() is None
