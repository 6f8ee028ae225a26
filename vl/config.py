"""Typed experiment configuration: dataclasses, YAML in, dotted overrides, validated.

Why dataclasses and not dicts: a config value travels as a typed field from the YAML file to
the code that uses it, so a typo is an error at load time (naming the key and the file), not a
silently ignored dict key three layers down.

A YAML file may name a preset (`preset: tiny`) and then override any section:

    preset: tiny
    model: {bicmf_layers: 1}
    train: {epochs: 20}

Overrides from the command line use dotted keys: `model.bicmf_layers=1`, `loss.hl_coef=5`,
`data.video_features=[slowfast,clip]` (values are parsed as YAML scalars / flow lists).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FEATURE_DIMS: dict[str, int] = {"slowfast": 2304, "clip": 512, "blip": 768, "i3d": 2048}
TEXT_FEATURE_DIMS: dict[str, int] = {"clip": 512, "blip": 768}
DATASETS = ("qvhighlights", "charades", "tvsum", "pretrain")
TVSUM_DOMAINS = ("BK", "BT", "DS", "FM", "GA", "MS", "PK", "PR", "VT", "VU")
TEF_DIMS = 2  # temporal endpoint features (i/L, (i+1)/L) appended to every clip
ALIGN_VIDEO = ("projection", "fra")
BICMF_NORMS = ("post", "branch")
FRA_OUTPUTS = ("norm", "plain", "residual")
MR2HD_GRU_INPUTS = ("slice", "padded")
FRA_WORD_TERMS = ("attention", "bias")
ATTENTION_INITS = ("xavier", "reference")
BICMF_POSITIONS = ("all", "reference")
DECODER_MEMORY = ("clips", "global_and_clips")
LABEL_REDUCTIONS = ("mean", "weight_sum")


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible; the message says where."""


@dataclass
class ModelConfig:
    """Sizes and switches of the VideoLights network (VIDEOLIGHTS_SPEC section 2, 6c)."""

    hidden_dim: int = 256
    nheads: int = 8
    bicmf_layers: int = 2
    enc_layers: int = 3
    dec_layers: int = 3
    num_queries: int = 10
    dim_feedforward: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.1  # on attention weights (forces SDPA's unfused path on CPU)
    input_dropout: float = 0.5
    n_input_proj: int = 2
    proj_kernel_size: int = 1
    video_dim: int = 3584  # sum of the video feature sets, without the 2 TEF dims
    text_dim: int = 1280
    max_q_l: int = 32  # size of the learned text position table used by Bi-CMF
    contrastive_dim: int = 64
    span_nce: bool = False  # Moment-DETR span-token NCE: an optional extra, off (6c.4)
    mr2hd: bool = True  # Uni-JFM MR->HD GRU branch
    # The branch's GRU reads the predicted moment's clips as the "slice" alone, or "padded" with
    # zeros to the clip count as the reference (see MomentToHighlight; docs/FIDELITY.md, 11).
    mr2hd_gru_input: str = "slice"
    fra: bool = True  # Feature Refinement and Alignment; off = the paper's "without FRA" ablation
    # FRA's output: "norm" = LayerNorm(FRA(V)) (default: the clips reach Bi-CMF at the scale of
    # its attention branches); "plain" = the paper's formula as is; "residual" = V + FRA(V).
    fra_output: str = "norm"
    # FRA's clip-word term V_Q: "attention" = each clip attends over the valid words; "bias" =
    # what the reference computes (a softmax over words times a vector equal for every word:
    # one learned vector for every clip, docs/FIDELITY.md, 11).
    fra_word_term: str = "attention"
    negative_pass: bool = True  # mismatched-query pass for the negative saliency
    # The mismatched pass refines the clips with its own (rolled) query; False reuses the FRA
    # output of the matching query, whose clips then carry the true query (docs/FIDELITY.md, 5).
    negative_fra: bool = True
    # What L_sym contrasts with the text: "projection" = the clips before FRA (query-free),
    # "fra" = FRA's output, which contains the text and lets L_sym be met by copying it (1).
    align_video: str = "projection"
    # The decoder cross-attends to "clips" (as the reference) or "global_and_clips" (3).
    decoder_memory: str = "clips"
    text_pos_std: float = 0.02  # init std of the learned text positions (1.0 = nn.Embedding's)
    global_token_std: float = 0.02  # init std of the global token and its position (ref: 1.0)
    # Bi-CMF's first two stages: "post" = norm(x + branch) (the reference, post-norm
    # transformers); "branch" = x + norm(branch) (Algorithm 2 as printed; see BiCMFLayer).
    bicmf_norm: str = "post"
    # The reference's Bi-CMF layer differs in three more ways (docs/FIDELITY.md, 11): no clip
    # self-attention stage, no residual around the final FFN, the words not carried between
    # layers. Each is a switch; all three False is the reference's layer shape.
    bicmf_self_attention: bool = True
    bicmf_ffn_residual: bool = True
    bicmf_carry_text: bool = True
    # Where Bi-CMF adds positions: "all" (queries, keys and values) or "reference" (the first
    # two stages' queries and keys only, as the authors' layer; see BiCMFLayer).
    bicmf_positions: str = "all"
    # Attention weights at init: "xavier" = Xavier per q/k/v/out matrix, default biases;
    # "reference" = q/k/v Xavier as one 3d x d matrix (nn.MultiheadAttention's in_proj, so
    # 1/sqrt(2) smaller) and zero attention biases, as the authors' code (FIDELITY.md, 11).
    # The paper / reference_script presets use "reference"; "tiny" (tests, smoke, demo) keeps
    # "xavier" until the demo is re-measured with it.
    attention_init: str = "xavier"

    @property
    def video_input_dim(self) -> int:
        return self.video_dim + TEF_DIMS


@dataclass
class LossConfig:
    """Loss weights; names follow the paper's coefficient names (spec 3.5)."""

    span_coef: float = 10.0
    giou_coef: float = 1.0
    label_coef: float = 4.0
    eos_coef: float = 0.1
    cost_span: float = 10.0
    cost_giou: float = 1.0
    cost_class: float = 4.0
    aux_loss: bool = True
    saliency_coef: float = 1.0  # lambda_sal
    margin: float = 0.2
    rank_temperature: float = 0.5
    al_coef: float = 0.1  # symmetric alignment L_sym
    scsl_coef: float = 1.0  # saliency cosine L_ts
    tcl_coef: float = 1.0  # task-coupled L_tc (MR->HD)
    hl_coef: float = 10.0  # hard positive / hard negative, W_j = (epoch + 1) * hl_coef
    hl_cap: float | None = None  # optional cap on W_j (the reference has none)
    span_nce_coef: float = 0.2
    nce_temperature: float = 0.07
    # Clip-sentence saliency-profile alignment on FRA's output (the reference's second `cal`
    # term): sum_b 1 - cos(cos(V'_j, mean text), y). 0 disables it.
    sal_align_coef: float = 0.2  # the reference's QVHighlights `cal`
    # Class CE reduction: "mean" over queries (Moment-DETR / the reference, with which
    # label_coef = 4 was tuned) or "weight_sum" (divided by the eos-weight sum, ~3.6x larger).
    label_reduction: str = "mean"


@dataclass
class DataConfig:
    """What to read and how to batch it."""

    dataset: str = "qvhighlights"
    train: str = ""  # shard URI (local path or s3://) of the training split
    val: str = ""  # shard URI of the evaluation split
    video_features: list[str] = field(default_factory=lambda: ["slowfast", "clip", "blip"])
    text_features: list[str] = field(default_factory=lambda: ["clip", "blip"])
    max_v_l: int = 75
    max_q_l: int = 32
    clip_len: float = 2.0
    max_windows: int = 5
    batch_size: int = 32
    eval_batch_size: int = 100
    loader_workers: int = 0  # DataLoader worker processes per training process
    # pad every batch to max_v_l clips / max_q_l tokens (Batch.padded_to): one shape for a
    # compiled model; same outputs and losses on the valid clips as batch-maximum padding
    static_shapes: bool = False
    shuffle_buffer: int = 1024
    tvsum_domain: str = ""
    # Which column of the paper's Table 7 gives the per-domain TVSum coefficients (hl, scsl and,
    # for the fine-tuned column, al): "i3d", "sf_clip_blip", "sf_clip_blip_finetuned"; "" = none.
    # A coefficient set explicitly (YAML or --set) beats the table.
    tvsum_table: str = ""

    def static_shape(self) -> tuple[int, int] | None:
        """(max_v_l, max_q_l) when every batch is padded to one shape, else None."""
        return (self.max_v_l, self.max_q_l) if self.static_shapes else None


@dataclass
class TrainConfig:
    """Optimisation and evaluation cadence (what any training loop needs, Ray or not)."""

    epochs: int = 200
    lr: float = 1e-4
    weight_decay: float = 1e-4
    lr_drop: int = 400
    lr_gamma: float = 0.1
    grad_clip: float = 0.1
    seed: int = 2018
    bf16: bool = False
    # torch.compile the model (needs data.static_shapes: one graph for every batch)
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager": trace, no codegen)
    eval_every: int = 5
    selection_metric: str = ""  # empty: the dataset's default (EVAL_SPEC section 5)


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's names


@dataclass
class ScaleConfig:
    """How a run is spread over a Ray cluster. Only `jobs/` reads this section: the core
    (`vl/`) trains the same way on one process or many."""

    num_workers: int = 2  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # also each worker's torch threads
    keep_checkpoints: int = 2  # best checkpoints Ray keeps (by the selection metric)
    max_failures: int = 2  # worker-group restarts before the run fails
    # how Ray places the workers: PACK fills a node first; SPREAD puts them on different nodes
    # where it can (a lost node then costs one rank, not all); STRICT_* refuse otherwise
    placement_strategy: str = "PACK"
    fail_at_step: int = -1  # fault injection for tests: rank 1 exits once at this global step
    # fault injection for tests: rank 1 exits once during the report of this epoch (1-based, an
    # evaluation epoch), after rank 0's checkpoint is in storage and before Ray Train records it
    fail_at_report: int = -1
    # fault injection for tests: rank 1 stops once at this global step and waits to be killed
    # from outside (after writing a marker to the run's storage): a node lost at a known step
    hold_at_step: int = -1


# Keys that moved: an old config that still uses one fails with a message naming the new key.
RENAMED_KEYS: dict[str, str] = {
    "data.num_workers": "data.loader_workers",
    **{f"train.{k}": f"scale.{k}" for k in ("num_workers", "use_gpu", "cpus_per_worker",
                                            "keep_checkpoints", "max_failures", "fail_at_step")},
}


@dataclass
class ExperimentConfig:
    """Everything one run needs. `source` records where it came from (for error messages)."""

    name: str = "videolights"
    preset: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
        """Build from a nested dict (a preset first, then the dict on top), then validate."""
        if not isinstance(raw, dict):
            kind = type(raw).__name__
            raise ConfigError(f"{source}: the top level must be a mapping, got {kind}")
        preset_name = raw.get("preset", "paper")
        if preset_name not in PRESETS:
            raise ConfigError(
                f"{source}: key 'preset': unknown preset {preset_name!r}; "
                f"choose one of {sorted(PRESETS)}"
            )
        merged = _deep_merge(copy.deepcopy(PRESETS[preset_name]), raw)
        merged["preset"] = preset_name
        cfg = _build(cls, merged, source, prefix="")
        _apply_recipe_tables(cfg, raw.get("loss") or {}, source)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_yaml(
        cls, path: str | Path, overrides: list[str] | None = None
    ) -> ExperimentConfig:
        """Load a YAML file and apply dotted `key=value` overrides on top."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from exc
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        raw = apply_overrides(raw, overrides or [], source=str(path))
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_preset(cls, name: str, overrides: list[str] | None = None) -> ExperimentConfig:
        raw = apply_overrides({"preset": name}, overrides or [], source=f"preset {name}")
        return cls.from_dict(raw, source=f"preset {name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- validation ---------------------------------------------------------------------
    def validate(self, source: str = "<config>") -> None:
        """Reject impossible combinations with a message naming the key and the source."""
        m, d, t, lo = self.model, self.data, self.train, self.loss

        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: key '{key}': {why}")

        if m.hidden_dim % m.nheads != 0:
            raise bad(
                "model.hidden_dim",
                f"{m.hidden_dim} is not divisible by model.nheads={m.nheads}",
            )
        if m.hidden_dim % 2 != 0:
            raise bad("model.hidden_dim", "must be even (sine position embeddings)")
        for key in ("hidden_dim", "nheads", "num_queries", "dim_feedforward", "n_input_proj",
                    "video_dim", "text_dim", "max_q_l", "contrastive_dim", "enc_layers",
                    "dec_layers"):
            if getattr(m, key) < 1:
                raise bad(f"model.{key}", f"must be >= 1, got {getattr(m, key)}")
        if m.bicmf_layers < 0:
            raise bad("model.bicmf_layers", f"must be >= 0, got {m.bicmf_layers}")
        if m.proj_kernel_size < 1 or m.proj_kernel_size % 2 == 0:
            raise bad("model.proj_kernel_size", "must be a positive odd number")
        for key in ("dropout", "attention_dropout", "input_dropout"):
            if not 0.0 <= getattr(m, key) < 1.0:
                raise bad(f"model.{key}", f"must be in [0, 1), got {getattr(m, key)}")
        if t.compile and not d.static_shapes:
            raise bad("train.compile", "needs data.static_shapes: true (one graph for every "
                      "batch; batch-maximum shapes would recompile for each new length)")
        if d.dataset not in DATASETS:
            raise bad("data.dataset", f"unknown dataset {d.dataset!r}; choose one of {DATASETS}")
        for name in d.video_features:
            if name not in FEATURE_DIMS:
                raise bad("data.video_features", f"unknown feature set {name!r}; "
                          f"choose from {sorted(FEATURE_DIMS)}")
        for name in d.text_features:
            if name not in TEXT_FEATURE_DIMS:
                raise bad("data.text_features", f"unknown text feature set {name!r}; "
                          f"choose from {sorted(TEXT_FEATURE_DIMS)}")
        if d.dataset == "tvsum" and d.tvsum_domain and d.tvsum_domain not in TVSUM_DOMAINS:
            raise bad("data.tvsum_domain", f"{d.tvsum_domain!r} is not one of {TVSUM_DOMAINS}")
        if d.max_q_l > m.max_q_l:
            raise bad("data.max_q_l", f"{d.max_q_l} exceeds model.max_q_l={m.max_q_l}")
        for key in ("max_v_l", "max_q_l", "batch_size", "eval_batch_size", "max_windows"):
            if getattr(d, key) < 1:
                raise bad(f"data.{key}", f"must be >= 1, got {getattr(d, key)}")
        if d.clip_len <= 0:
            raise bad("data.clip_len", f"must be > 0, got {d.clip_len}")
        if t.epochs < 1:
            raise bad("train.epochs", f"must be >= 1, got {t.epochs}")
        if not (math.isfinite(t.lr) and t.lr > 0):
            raise bad("train.lr", f"must be a finite number > 0, got {t.lr}")
        if t.lr_drop < 1:
            raise bad("train.lr_drop", f"must be >= 1 (epochs between lr drops), got {t.lr_drop}")
        for key in ("weight_decay", "lr_gamma", "grad_clip"):
            if not math.isfinite(getattr(t, key)):
                raise bad(f"train.{key}", f"must be a finite number, got {getattr(t, key)}")
        if not (math.isfinite(self.scale.cpus_per_worker) and self.scale.cpus_per_worker > 0):
            raise bad("scale.cpus_per_worker", f"must be > 0, got {self.scale.cpus_per_worker}")
        if t.eval_every < 1:
            raise bad("train.eval_every", f"must be >= 1, got {t.eval_every}")
        if self.scale.num_workers < 1:
            raise bad("scale.num_workers", f"must be >= 1, got {self.scale.num_workers}")
        if self.scale.placement_strategy not in PLACEMENT_STRATEGIES:
            raise bad("scale.placement_strategy", "must be one of "
                      f"{', '.join(PLACEMENT_STRATEGIES)}, got {self.scale.placement_strategy!r}")
        if d.loader_workers < 0:
            raise bad("data.loader_workers", f"must be >= 0, got {d.loader_workers}")
        if t.grad_clip < 0:
            raise bad("train.grad_clip", f"must be >= 0 (0 disables), got {t.grad_clip}")
        choices = {"model.align_video": (m.align_video, ALIGN_VIDEO),
                   "model.bicmf_norm": (m.bicmf_norm, BICMF_NORMS),
                   "model.fra_output": (m.fra_output, FRA_OUTPUTS),
                   "model.mr2hd_gru_input": (m.mr2hd_gru_input, MR2HD_GRU_INPUTS),
                   "model.fra_word_term": (m.fra_word_term, FRA_WORD_TERMS),
                   "model.attention_init": (m.attention_init, ATTENTION_INITS),
                   "model.bicmf_positions": (m.bicmf_positions, BICMF_POSITIONS),
                   "model.decoder_memory": (m.decoder_memory, DECODER_MEMORY),
                   "loss.label_reduction": (lo.label_reduction, LABEL_REDUCTIONS)}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise bad(key, f"{value!r} is not one of {allowed}")
        for key in ("text_pos_std", "global_token_std"):
            if not getattr(m, key) >= 0:
                raise bad(f"model.{key}", f"must be >= 0, got {getattr(m, key)}")
        for key in ("span_coef", "giou_coef", "label_coef", "al_coef", "scsl_coef", "tcl_coef",
                    "hl_coef", "saliency_coef", "sal_align_coef", "span_nce_coef"):
            if getattr(lo, key) < 0:
                raise bad(f"loss.{key}", f"must be >= 0, got {getattr(lo, key)}")
        if not 0 < lo.eos_coef <= 1:
            raise bad("loss.eos_coef", f"must be in (0, 1], got {lo.eos_coef}")


# ---- presets ----------------------------------------------------------------------------
def feature_set_widths(video: list[str], text: list[str]) -> tuple[int, int]:
    """(model.video_dim, model.text_dim) of the official feature sets, before any shard is read
    (a shard manifest's own widths win: `vl.data.shards.ShardManifest.input_widths`)."""
    return sum(FEATURE_DIMS[n] for n in video), sum(TEXT_FEATURE_DIMS[n] for n in text)


def _feature_dims(video: list[str], text: list[str]) -> dict[str, Any]:
    video_dim, text_dim = feature_set_widths(video, text)
    return {
        "model": {"video_dim": video_dim, "text_dim": text_dim},
        "data": {"video_features": list(video), "text_features": list(text)},
    }


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `top` into `base` (mutates and returns base)."""
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _preset(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        _deep_merge(out, part)
    return out


PRESETS: dict[str, dict[str, Any]] = {
    # Section 6b: what the paper states (2 Bi-CMF, SF+CLIP+BLIP video / CLIP+BLIP text).
    # Attention at nn.MultiheadAttention's init scale, as the authors' code: at the paper
    # recipe it is what lets the saliency head learn in the first 100 steps (FIDELITY.md, 11).
    "paper": _preset(
        {"model": {"bicmf_layers": 2, "attention_init": "reference"}},
        _feature_dims(["slowfast", "clip", "blip"], ["clip", "blip"]),
    ),
    # What every reference launch script actually runs (spec section 6, items 1-2).
    # Its objective is the scripts' too: span NCE on, `cal` per dataset (_apply_recipe_tables).
    "reference_script": _preset(
        {"model": {"bicmf_layers": 1, "span_nce": True, "attention_init": "reference"}},
        _feature_dims(["slowfast", "clip"], ["clip"]),
    ),
    # Small enough for unit tests: seconds per step on a laptop core.
    "tiny": _preset(
        {
            "model": {
                "hidden_dim": 32, "nheads": 4, "bicmf_layers": 1, "enc_layers": 1,
                "dec_layers": 2, "num_queries": 5, "dim_feedforward": 64,
                "video_dim": 48, "text_dim": 24, "max_q_l": 16, "contrastive_dim": 16,
                "input_dropout": 0.1,
            },
            "data": {"video_features": ["slowfast", "clip"], "text_features": ["clip"],
                     "max_v_l": 24, "max_q_l": 16, "batch_size": 4, "eval_batch_size": 8},
            "train": {"epochs": 2, "eval_every": 1},
            "scale": {"num_workers": 1},
        },
    ),
}


# ---- per-dataset recipe tables ----------------------------------------------------------
def _table7(hl: str, scsl: str, al: str | None = None) -> dict[str, dict[str, float]]:
    """One column of the paper's Table 7, written in the paper's domain order."""
    order = ("VT", "VU", "GA", "MS", "PK", "PR", "FM", "BK", "BT", "DS")
    rows = {d: {"hl_coef": float(h), "scsl_coef": float(c)}
            for d, h, c in zip(order, hl.split(), scsl.split(), strict=True)}
    for d, a in zip(order, (al or "").split(), strict=False):
        rows[d]["al_coef"] = float(a)
    return rows


TVSUM_TABLE7: dict[str, dict[str, dict[str, float]]] = {
    "i3d": _table7("10 1 1 1 10 10 10 1 10 10", "1 1 10 5 5 10 5 1 1 10"),
    "sf_clip_blip": _table7("10 10 10 10 10 10 10 10 10 10", "10 5 10 1 5 10 1 10 10 10"),
    "sf_clip_blip_finetuned": _table7("1 1 5 1 5 1 5 1 5 10", "5 1 1 1 10 10 10 5 10 5",
                                      "0.8 0.8 0.1 0.8 0.1 0.8 0.1 0.8 0.1 0.8"),
}
# The launch scripts' `contrastive_align_loss_coef` per dataset (spec 4): span NCE + profile
# alignment weighted together, no symmetric L_sym.
REFERENCE_CAL = {"qvhighlights": 0.2, "charades": 0.3, "pretrain": 0.01, "tvsum": 0.8}


def _apply_recipe_tables(cfg: ExperimentConfig, explicit: dict[str, Any], source: str) -> None:
    """Fill loss coefficients from the recipe tables where the config did not set them."""
    lo, d = cfg.loss, cfg.data
    table: dict[str, float] = {}
    if d.tvsum_table:
        if d.tvsum_table not in TVSUM_TABLE7:
            raise ConfigError(f"{source}: key 'data.tvsum_table': {d.tvsum_table!r} is not one "
                              f"of {sorted(TVSUM_TABLE7)}")
        if d.dataset == "tvsum" and d.tvsum_domain in TVSUM_DOMAINS:
            table.update(TVSUM_TABLE7[d.tvsum_table][d.tvsum_domain])
    if cfg.preset == "reference_script":
        cal = REFERENCE_CAL.get(d.dataset, 0.2)
        table.update({"span_nce_coef": cal, "sal_align_coef": cal, "al_coef": 0.0})
    for key, value in table.items():
        if key not in explicit:
            setattr(lo, key, value)


# ---- typed building ---------------------------------------------------------------------
def _build(cls: type, raw: dict[str, Any], source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: key '{prefix.rstrip('.') or '<root>'}': expected a mapping, "
            f"got {type(raw).__name__}"
        )
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if f"{prefix}{key}" in RENAMED_KEYS:
            raise ConfigError(f"{source}: key '{prefix}{key}' is now "
                              f"'{RENAMED_KEYS[prefix + key]}'; rename it")
        if key not in known:
            hint = _closest(key, known)
            raise ConfigError(
                f"{source}: unknown key '{prefix}{key}'"
                + (f" (did you mean '{prefix}{hint}'?)" if hint else "")
                + f"; valid keys here: {sorted(known)}"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        kwargs[f.name] = _coerce(raw[f.name], hints[f.name], source, f"{prefix}{f.name}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, source: str, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], source, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: key '{key}': expected a list, got {value!r}")
        return [_coerce(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: key '{key}': expected a string, got {value!r}")
    return value


def _closest(key: str, known: set[str]) -> str | None:
    match = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return match[0] if match else None


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `a.b=value` strings onto a nested dict (values parsed as YAML); see apply_values."""
    values: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. model.bicmf_layers=1")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            values[key] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return apply_values(raw, values)


def apply_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the nested dict `raw` with `{"a.b": value}` set at each dotted path: what
    `--set` does, and how a tune trial's config (`tune.space`) becomes an experiment config."""
    raw = copy.deepcopy(raw)
    for key, value in values.items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}={value!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw
