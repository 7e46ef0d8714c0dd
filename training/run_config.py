"""Run configuration: a YAML file validated by pydantic, with named presets.

A preset (``training/presets/<name>.yaml``) names the model sizes (a ``ModelConfig`` preset plus
overrides), the training budget, the corpus size and the Ray resources of each task. Unknown
keys and bad values are refused with a message naming the field; command-line flags override.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from experts.config import ModelConfig
from router.domains import DOMAINS, check_domain

PRESET_DIR = Path(__file__).parent / "presets"


class RunConfigError(ValueError):
    """A run configuration file or override is invalid; the message says what to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """A ``ModelConfig`` preset name plus field overrides (``vocab_size`` comes from the tokenizer)."""

    preset: str = "tiny"
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _valid(self) -> "ModelSpec":
        self.build()  # raises ValueError naming the field
        return self

    def build(self, **more: Any) -> ModelConfig:
        ov = {**self.overrides, **more}
        known = set(ModelConfig.__dataclass_fields__)
        unknown = sorted(set(ov) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; known: {sorted(known)}")
        if isinstance(ov.get("moe"), dict):
            base = ModelConfig.preset(self.preset).moe
            try:
                ov["moe"] = dataclasses.replace(base, **ov["moe"])
            except TypeError as e:
                raise ValueError(f"moe overrides {ov['moe']}: {e}") from None
        return ModelConfig.preset(self.preset, **ov)


class DataSpec(_Strict):
    size: str = "tiny"  # training.data.build_corpora(size, cache_dir)
    cache_dir: str | None = None  # None: $HMOE_DATA_DIR, else .hmoe/data
    spec: str | None = None  # a corpus spec YAML (training.data.spec.CorpusSpec) instead of the built-in `size`

    @model_validator(mode="after")
    def _spec_loads(self) -> "DataSpec":
        self.corpus_spec()  # a missing or invalid spec file fails here, naming it
        return self

    def corpus_spec(self) -> Any:
        """The user's ``CorpusSpec``, or None for the built-in corpus of ``size``."""
        if self.spec is None:
            return None
        from training.data.spec import CorpusSpec

        path = Path(self.spec)
        if not path.is_file():
            raise ValueError(f"data.spec: {path} does not exist; pass a corpus spec YAML file")
        try:
            return CorpusSpec.from_yaml(path)
        except (ValidationError, yaml.YAMLError) as e:
            raise ValueError(f"data.spec: {path} is not a valid corpus spec: {e}") from None

    def corpus_name(self) -> str:
        """The corpus's directory in the cache (``training.data.build.corpus_dir_name``)."""
        spec = self.corpus_spec()
        if spec is None:
            return self.size
        from training.data.build import corpus_dir_name

        return corpus_dir_name(spec)


class LoopSettings(_Strict):
    """How a model is optimised, evaluated and checkpointed: the fields that the run config's
    ``train`` section and ``training.loop.LoopConfig`` (one ``train`` call) share, defined once."""

    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    eval_every: int = Field(50, ge=0)  # 0 disables periodic validation (a final one still runs)
    eval_batches: int = Field(10, ge=0)  # at most this many validation batches per evaluation
    patience: int = Field(0, ge=0)  # evaluations without improvement before stopping; 0 = never stop early
    ckpt_every: int = Field(50, ge=0)  # 0: only the final checkpoint
    log_every: int = Field(10, ge=1)
    # the recipe: Muon on the hidden matrices (AdamW at ``lr`` on the rest) with warmup-stable-decay,
    # measured better than AdamW + cosine at equal compute (docs/recipe_ab.md; training/optim.py)
    optimizer: Literal["adamw", "muon"] = "muon"
    muon_lr: float = Field(0.02, gt=0)  # peak lr of the Muon groups (the schedule scales it like ``lr``)
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    muon_weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "wsd"] = "wsd"
    decay_fraction: float = Field(0.2, ge=0, le=1)  # wsd: final fraction of steps decaying to min_lr

    @model_validator(mode="after")
    def _lr_order(self) -> "LoopSettings":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} must be <= lr={self.lr}")
        return self

    def loop_settings(self) -> dict[str, Any]:
        """These fields alone (a ``train`` section also holds the budget and the data shape)."""
        return self.model_dump(include=set(LoopSettings.model_fields))


_PER_BRANCH_RANGE = {  # TrainSpec's per-branch settings: which values are valid, and the rule as said
    "branch_replay": (lambda x: 0 <= x < 1, "a share must be in [0, 1)"),
    "branch_non_ffn_lr": (lambda x: 0 <= x <= 1, "a multiple must be in [0, 1]"),
}
# what a branch replays: the seed's mixed corpus, its group's other corpora, or one named domain's corpus
ReplayFrom = Literal[("seed", "group", *DOMAINS)]


def _for_branch(value: Any, domain: str, default: Any) -> Any:
    """A per-branch setting's value for ``domain``: one value for all, or a domain's own (else ``default``)."""
    return value.get(domain, default) if isinstance(value, dict) else value


class TrainSpec(LoopSettings):
    """Budget and optimisation of one expert (baselines derive theirs from it)."""

    steps: int = Field(100, ge=1)  # optimizer steps per expert; the budget is len(experts) x steps
    # Branch-Train-Merge: this share of the budget trains one seed LM on the mixed corpus, and each
    # expert branches from it with the rest of its steps (0: experts start from random weights)
    seed_fraction: float = Field(0.0, ge=0, lt=1)
    # a branch's learning rate outside its FFNs (embeddings, attention, norms), as a multiple of the
    # lr: below 1 the experts keep those close to the seed's (its general language; and merging them,
    # which averages them, loses little), while the FFNs learn the domain at full rate. One multiple
    # for every branch, or one per domain ({reasoning: 0.1}; a domain not named learns at full rate)
    branch_non_ffn_lr: float | dict[str, float] = 1.0
    # the share of a branch's pretraining batches that replay the seed's mixed corpus (every domain in
    # turn), so that an expert keeps the general language it branched with while it specialises: one
    # share for every branch, or a share per domain ({reasoning: 0.5}; a domain not named replays none)
    branch_replay: float | dict[str, float] = 0.0
    # what a branch replays: "seed", the seed's mixed corpus; "group", the corpora of the other
    # domains of its group (reasoning replays math; conversation and knowledge each other's); or one
    # other domain's corpus, by name ({code: math}). A domain alone in its group (code) replays nothing
    # under "group". One choice for every branch ("seed" or "group"), or one per domain
    # ({conversation: group}; a domain not named replays the seed's corpus)
    branch_replay_from: ReplayFrom | dict[str, ReplayFrom] = "seed"
    # the instruction stage (supervised fine-tuning in the chat format, loss on the answers only):
    # this share of each expert's and each generalist's steps, at the end of its training
    instruct_fraction: float = Field(0.0, ge=0, lt=1)
    # the share of the instruction stage's batches that replay pretraining data, so that the model
    # keeps modelling raw text (without it, own-domain test perplexity rose 1.1-25x on `standard`)
    instruct_replay: float = Field(0.5, ge=0, lt=1)
    # the seed's own instruction stage: this share of the seed's steps ends on every domain's
    # instruction items, so each branch starts already following the chat format
    seed_instruct_fraction: float = Field(0.0, ge=0, lt=1)
    # of the math curriculum's instruction items, the share that are multi-term expressions (the rest
    # two operands): a branch with too few instruction batches stops copying plain questions at 0.5
    expr_share: float = Field(0.2, ge=0, le=1)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(64, ge=8)
    eval_batches: int = Field(10, ge=1)

    @field_validator("branch_replay", "branch_non_ffn_lr", "branch_replay_from")
    @classmethod
    def _per_branch(cls, v: Any, info: ValidationInfo) -> Any:
        in_range, rule = _PER_BRANCH_RANGE.get(info.field_name, (None, ""))  # a choice: its type checked it
        for d, x in (v.items() if isinstance(v, dict) else [("every branch", v)]):
            if isinstance(v, dict):
                check_domain(d)  # an unknown domain is named with the choices
            if in_range is not None and not in_range(x):
                raise ValueError(f"{info.field_name} for {d} is {x!r}: {rule}")
            if info.field_name == "branch_replay_from" and x in DOMAINS and (x == d or not isinstance(v, dict)):
                raise ValueError(f"{info.field_name} for {d} is {x!r}: a branch replays another domain's corpus; "
                                 f"name it per domain ({{code: math}}), or use 'seed' or 'group'")
        return v

    def replay_for(self, domain: str) -> float:
        """The share of ``domain``'s branch batches that replay (what: :meth:`replay_from_for`)."""
        return float(_for_branch(self.branch_replay, domain, 0.0))

    def non_ffn_lr_for(self, domain: str) -> float:
        """``domain``'s branch learning rate outside its FFNs, as a multiple of the lr."""
        return float(_for_branch(self.branch_non_ffn_lr, domain, 1.0))

    def replay_from_for(self, domain: str) -> str:
        """What ``domain``'s branch replays: ``"seed"``, ``"group"`` or another domain's name."""
        return str(_for_branch(self.branch_replay_from, domain, "seed"))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum


class Resources(_Strict):
    """Ray resources of each training task."""

    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    max_retries: int = Field(2, ge=0)


class BaselineSpec(_Strict):
    """Generalists trained on the union of the domains with the experts' total compute."""

    enabled: bool = False
    kinds: tuple[Literal["dense", "moe"], ...] = ("dense", "moe")  # which generalists to train
    dense: ModelSpec | None = None  # None: the expert's model
    moe: ModelSpec = ModelSpec(preset="tiny-moe")
    match_active_params: bool = True  # pick moe.expert_hidden so active params ~= one expert's


class ReportSpec(_Strict):
    eval_batches: int = Field(20, ge=1)  # test batches per (model, domain) cell
    gen_items: int = Field(20, ge=0)  # exact-match items for math and reasoning
    samples: int = Field(3, ge=0)  # sampled continuations per expert
    max_new_tokens: int = Field(32, ge=1)


class RouterSpec(_Strict):
    """The router is trained by ``training.router_train.train_router``."""

    enabled: bool = True
    steps: int | None = Field(None, ge=1)  # None: the router package's default
    per_domain: int | None = Field(None, ge=1)  # training prompts per domain


class MergeSpec(_Strict):
    """Branch-Train-MiX (``training.merge``): the experts merged into one MoE, then fine-tuned on the
    mixed corpus. Its fine-tune counts in the system's compute, and the generalists get the same total."""

    enabled: bool = False
    top_k: int = Field(2, ge=1)  # routed experts per token in the merged model
    steps: int = Field(100, ge=1)  # fine-tuning steps on the mixed corpus
    train: Literal["all", "routers"] = "all"  # what the fine-tune updates
    # the fine-tune's learning rates (lr, min_lr, muon_lr) as a multiple of the experts' own: the
    # merged model starts trained, and the experts' peak rate undoes much of what they learned
    # (standard: merged/dense mixed perplexity 1.214 at 1.0, 0.947 at 0.3; docs/benchmarks.md)
    lr_scale: float = Field(0.3, gt=0, le=1)
    # the routers' learning rate as a multiple of the experts' (None: lr_scale, as every other weight)
    router_lr: float | None = Field(None, gt=0, le=1)
    # the routers' start: "zero" (the paper's; every expert equally likely), "centroids" (each layer's
    # gate a nearest-centroid classifier of the domains: training.merge.centroid_gates) or "fitted"
    # (a logistic regression of the domain on what the gate reads: training.merge.fitted_gates)
    gate_init: Literal["zero", "centroids", "fitted"] = "zero"
    # what becomes routed experts: "ffn" (the paper: FFNs routed, the rest averaged), "all" (the
    # attention projections and LM head routed too, norms folded in, only input embeddings averaged)
    # or "full" (the input embeddings routed too: nothing of an expert is averaged away)
    route: Literal["ffn", "all", "full"] = "ffn"
    # what the routers read: each token's own input ("token", the paper's), the running mean of the
    # inputs of its sequence so far ("mean": a document-level choice, still made per token and causal),
    # or that mean restarted at each document's <|bos|> ("doc": in the fine-tune's packed rows each
    # document is routed from its own tokens, as a request is when served)
    gate_context: Literal["token", "mean", "doc"] = "token"
    # where the routers are: one per routed module ("layer", the paper's), or one for the whole model
    # ("model": the run's router, frozen, reads the opening of each token's document and chooses its
    # experts once for every routed module, as DEMix layers route by domain; a token sent to expert i
    # alone is then computed by expert i alone; needs all five experts, the router and gate_context "doc")
    gate_scope: Literal["layer", "model"] = "layer"


class RunConfig(_Strict):
    """Everything ``hmoe train`` needs; saved as ``run.yaml`` in the run directory."""

    name: str
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    experts: tuple[str, ...] = DOMAINS
    train: TrainSpec = TrainSpec()
    resources: Resources = Resources()
    baselines: BaselineSpec = BaselineSpec()
    report: ReportSpec = ReportSpec()
    run_dir: str | None = None  # default: runs/<name>
    router: RouterSpec = RouterSpec()
    merge: MergeSpec = MergeSpec()

    @field_validator("experts", mode="before")
    @classmethod
    def _experts(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        if not v:
            raise ValueError(f"experts must name at least one of {list(DOMAINS)}")
        for d in v:
            check_domain(d)
        if len(set(v)) != len(v):
            raise ValueError(f"experts {list(v)} has duplicates")
        return tuple(v)

    @model_validator(mode="after")
    def _experts_in_corpus(self) -> "RunConfig":
        spec = self.data.corpus_spec()
        if spec is None:
            return self
        have = [d.domain for d in spec.domains]
        if "experts" not in self.model_fields_set:  # default: one expert per domain of the spec
            object.__setattr__(self, "experts", tuple(d for d in DOMAINS if d in have))
        missing = [d for d in self.experts if d not in have]
        if missing:
            raise ValueError(f"experts {missing} have no domain in the corpus spec {self.data.spec} "
                             f"(it has {have}); pass --experts {','.join(have)}")
        return self

    @model_validator(mode="after")
    def _seq_fits(self) -> "RunConfig":
        max_len = self.model.build().max_seq_len
        if self.train.seq_len > max_len:
            raise ValueError(f"train.seq_len={self.train.seq_len} exceeds the model's max_seq_len={max_len}")
        if self.merge.enabled and self.merge.top_k > len(self.experts):
            raise ValueError(f"merge.top_k={self.merge.top_k} exceeds the {len(self.experts)} experts")
        m = self.merge
        if m.enabled and m.gate_scope == "model":
            if tuple(self.experts) != DOMAINS or not self.router.enabled:
                raise ValueError(f"merge.gate_scope 'model' routes with the run's router over all of {list(DOMAINS)}: "
                                 "train every expert and the router, or use gate_scope 'layer'")
            if m.train == "routers" or m.gate_context != "doc":
                raise ValueError("merge.gate_scope 'model' keeps the run's router as trained and reads each "
                                 "token's document: use merge.train 'all' and merge.gate_context 'doc'")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _nested_set(d: dict[str, Any], dotted: str, value: Any) -> None:
    *head, last = dotted.split(".")
    for k in head:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise RunConfigError(f"override {dotted!r}: {k!r} is not a section")
    d[last] = value


def load_run_config(preset_or_path: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a preset name or a YAML path, apply dotted ``overrides`` ({"train.steps": 10}), validate."""
    path = Path(preset_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{preset_or_path}.yaml"
        if not path.exists():
            raise RunConfigError(f"unknown preset {preset_or_path!r}; choose one of {preset_names()} "
                                 "or pass a path to a YAML file")
    if not path.is_file():
        raise RunConfigError(f"run config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RunConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise RunConfigError(f"{path}: the top level must be a mapping of settings")
    for k, v in (overrides or {}).items():
        if v is not None:
            _nested_set(raw, k, v)
    return validate_run_config(raw, source=str(path))


def validate_run_config(raw: dict[str, Any], *, source: str = "run config") -> RunConfig:
    """Validate a raw mapping; errors list every bad field as ``a.b.c: message``."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
                 for err in e.errors()]
        raise RunConfigError(f"{source} is invalid:\n" + "\n".join(lines)) from None
