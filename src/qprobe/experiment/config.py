"""The experiment config: a tree of dataclasses that the YAML file mirrors, key for key.

`load_config(path, sets)` reads the YAML, applies `dotted.key=value` overrides (`qprobe run
--set`) and validates; unknown keys are refused with their path (`experiment.sampling: unknown
key(s) ['kk']`). Every field's `help` metadata is its one description (see docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qprobe.collect.config import RayConfig
from qprobe.defaults import MAX_NEW_TOKENS, TEMPERATURE, TOP_P
from qprobe.errors import QProbeError


@dataclass
class ModelConfig:
    """The frozen model and where its features are read."""

    name: str = field(
        default="default",
        metadata={
            "help": "'default' (embedded SmolLM2-135M-Instruct), 'qwen2.5-coder-0.5b', a .gguf file "
            "or a transformers folder"
        },
    )
    layer: int | None = field(
        default=None,
        metadata={
            "help": "feature layer (0-based block; negative counts from the top; null: ~80% depth)"
        },
    )
    position: str = field(default="last", metadata={"help": "feature position: last or mean"})
    chat: bool | None = field(
        default=None,
        metadata={"help": "wrap prompts in the chat template (null: when the tokenizer has one)"},
    )
    max_batch_rows: int | None = field(default=None, metadata={"help": "sequences decoded at once (default: by model width, 128-512 on CPU; see backends.hf.default_batch_rows)"})


@dataclass
class SamplingConfig:
    """How the k candidates are drawn (paper, code: temperature 0.8, top-p 0.95)."""

    k: int = field(default=16, metadata={"help": "samples per prompt (train and test)"})
    temperature: float = field(default=TEMPERATURE, metadata={"help": "sampling temperature"})
    top_p: float = field(default=TOP_P, metadata={"help": "nucleus sampling mass"})
    max_new_tokens: int = field(default=MAX_NEW_TOKENS, metadata={"help": "tokens per completion"})


@dataclass
class DataConfig:
    """One prompt set: a task and a split, optionally only its first `limit` prompts."""

    task: str = field(default="", metadata={"help": "task name, .jsonl path or module:function"})
    split: str = field(default="train", metadata={"help": "split of the task"})
    limit: int | None = field(default=None, metadata={"help": "first N prompts only (null: all)"})
    name: str = field(default="", metadata={"help": "label in the report (default: task-split)"})

    @property
    def label(self) -> str:
        return self.name or f"{self.task}-{self.split}".replace("/", "_").replace(":", "_")


@dataclass
class ProbesConfig:
    """Which probes to train: objectives x seeds, with trainer settings (qprobe.train)."""

    objectives: list[str] = field(
        default_factory=lambda: ["q", "ce", "pg"],
        metadata={"help": "training objectives (q, ce, pg; bt/dpo need preference pairs)"},
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "training seeds per objective (spread in every figure)"},
    )
    train: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "TrainConfig overrides, e.g. {lr: 1e-3, epochs: 50} (objective/seed are set)"
        },
    )
    cv: int = field(default=0, metadata={
        "help": "choose each objective's inputs (feature set, log-likelihoods) and regularisation "
                "by this many folds of cross-validation over the train prompts (0: off; see "
                "qprobe.train.cv); every seed then trains the chosen setting"})
    cv_grid: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "qprobe.train.cv.CVGrid overrides, e.g. {min_steps: [1000, 10000], loglik: [without, "
                "with, only]}"})


@dataclass
class EmbedStageConfig:
    """Re-encoding of every rollouts folder (`qprobe embed`): log-likelihoods, feature sets."""

    enabled: bool = field(default=False, metadata={
        "help": "run `qprobe embed` on the train, test and greedy folders after collection"})
    layers: list[int] | None = field(default=None, metadata={
        "help": "blocks to read (null: about half depth, the collection layer, the last block)"})
    positions: list[str] = field(default_factory=lambda: ["last", "mean"],
                                 metadata={"help": "feature positions: last and/or mean"})


@dataclass
class EvalConfig:
    """What the evaluation reports."""

    ks: list[int] = field(
        default_factory=lambda: [1, 2, 4, 8, 16],
        metadata={"help": "k values of the reward-vs-k figure"},
    )
    betas: list[float] = field(
        default_factory=lambda: [0.0, 0.1],
        metadata={"help": "selection temperatures evaluated (0 = argmax)"},
    )
    beta: float = field(default=0.1, metadata={"help": "beta of the headline table"})
    with_greedy: bool = field(default=False, metadata={
        "help": "also evaluate each probe choosing among the greedy completion plus k-1 random "
                "samples (needs baselines.greedy and, for probes on re-encoded inputs, the "
                "greedy folder embedded)"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples for the 95% CIs"})


@dataclass
class BaselinesConfig:
    """Baselines decoded greedily on every test set."""

    greedy: bool = field(default=True, metadata={"help": "greedy decoding baseline"})
    few_shot: int = field(
        default=5,
        metadata={
            "help": "successful train completions shown before the prompt (0: no few-shot baseline)"
        },
    )
    rerank: bool = field(default=True, metadata={
        "help": "reranking by mean and by sum of token log-probability (where the test rollouts "
                "have log-likelihoods)"})
    visible: bool = field(default=False, metadata={
        "help": "code tasks: run the tests each prompt shows on every sample (train, test, "
                "greedy) for a visible_reward column: the baseline 'filter by the shown tests, "
                "then mean log-prob', and an input cross-validation may give the probes"})
    vote: bool = field(default=False, metadata={
        "help": "answer tasks with programs (gsm8k-pal): each sample's answer stored as its "
                "execution signature (exec_sig, run in the sandbox after collection, train and "
                "test); rows: majority vote over the k answers (self-consistency) and, per "
                "probe, the vote weighted by its scores; the answer's vote share (mbr_share) is "
                "an input cross-validation may give the probes (cv_grid.signals)"})
    rules: bool = field(default=False, metadata={
        "help": "code tasks: a row for each zero-parameter rule over the free signals the test "
                "rollouts store (shown-test error class, MBR-exec, CodeT, ...; `qprobe signals`, "
                "qprobe.verifier.baselines.RULES), each probe paired against every one"})


@dataclass
class CurveConfig:
    """Reward vs number of training prompts (paper figure 2)."""

    sizes: list[int] = field(
        default_factory=list,
        metadata={"help": "numbers of training prompts (empty: no learning curve)"},
    )
    subsets: int = field(default=10, metadata={"help": "random prompt subsets per size"})
    objective: str = field(default="pg", metadata={"help": "objective of the curve's probes"})
    samples: list[int] = field(
        default_factory=list,
        metadata={"help": "samples per train prompt (all prompts, `subsets` random draws of that "
                          "many of each prompt's samples): more samples vs more prompts at equal "
                          "rows (empty: none)"},
    )


@dataclass
class ExecutorConfig(RayConfig):
    """Where the collection's batches run (`qprobe collect --executor`, docs/scale-out.md): the
    kind, and with ray the knobs of `RayConfig` (address, workers, ..., the same keys)."""

    kind: str = field(default="local", metadata={
        "help": "local (this process) or ray (actors on a Ray cluster collect the train and test "
                "sets and the greedy baseline; the few-shot baseline and the rest stay here)"})


@dataclass
class ExperimentConfig:
    """A whole experiment; `qprobe run` reads it from YAML (same keys, nested)."""

    name: str = field(default="experiment", metadata={"help": "experiment name"})
    out: str = field(
        default="",
        metadata={
            "help": "output folder (default: runs/<name>); relative paths are relative to the cwd"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of sampling, subsets and bootstrap"})
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: DataConfig = field(default_factory=DataConfig, metadata={"help": "training prompts"})
    test: list[DataConfig] = field(
        default_factory=list,
        metadata={"help": "test sets (the first one is used for the learning curve)"},
    )
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    curve: CurveConfig = field(default_factory=CurveConfig)
    embed: EmbedStageConfig = field(default_factory=EmbedStageConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    policies: dict[str, str] = field(default_factory=dict, metadata={
        "help": "NAME: policy spec (KIND[:key=value,...], see policy/specs.py) answering every "
                "test prompt once, evaluated beside the probes (same rows, CIs, paired columns); "
                "e.g. {guided: 'guided:head=runs/head,beta=5', qa: 'qadapter:adapter=runs/qa'}"})

    def validate(self) -> None:
        where = f"experiment {self.name!r}"
        if not self.train.task:
            raise QProbeError(f"{where}: train.task is required")
        if not self.test:
            raise QProbeError(f"{where}: at least one test set is required")
        for t in self.test:
            if not t.task:
                raise QProbeError(f"{where}: every test set needs a task")
        labels = [t.label for t in self.test]
        if len(set(labels)) != len(labels):
            raise QProbeError(f"{where}: test set names must differ, got {labels}")
        if self.executor.kind not in ("local", "ray"):
            raise QProbeError(f"{where}: executor.kind must be local or ray, got "
                              f"{self.executor.kind!r}")
        if self.executor.storage not in ("auto", "shared", "driver"):
            raise QProbeError(f"{where}: executor.storage must be auto, shared or driver")
        if self.sampling.k < 1:
            raise QProbeError(f"{where}: sampling.k must be >= 1")
        if not self.probes.objectives or not self.probes.seeds:
            raise QProbeError(f"{where}: probes.objectives and probes.seeds must not be empty")
        if any(k < 1 or k > self.sampling.k for k in self.eval.ks):
            raise QProbeError(
                f"{where}: eval.ks must be between 1 and sampling.k={self.sampling.k}"
            )
        if self.sampling.k not in self.eval.ks:
            self.eval.ks = sorted({*self.eval.ks, self.sampling.k})
        if self.eval.beta not in self.eval.betas:
            self.eval.betas = sorted({*self.eval.betas, self.eval.beta})
        from qprobe.train import TrainConfig

        names = {f.name for f in dataclasses.fields(TrainConfig)}
        bad = sorted(set(self.probes.train) - names)
        if bad:
            raise QProbeError(
                f"{where}: probes.train: unknown key(s) {bad}; known: {sorted(names)}"
            )
        for obj in [*self.probes.objectives, self.curve.objective]:
            self.train_config(obj, 0).validate()
        if not isinstance(self.policies, dict):
            raise QProbeError(f"{where}: policies must be a mapping NAME: SPEC")
        import re

        from qprobe.policy import registry

        for name, spec in self.policies.items():
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
                raise QProbeError(f"{where}: policies: name {name!r} may hold only letters, "
                                  "digits, '_', '.', '-'")
            registry.read(spec)  # a bad spec is refused before anything runs

    def train_config(self, objective: str, seed: int) -> Any:
        from qprobe.train import TrainConfig

        kw = dict(self.probes.train)
        if "hidden" in kw:
            kw["hidden"] = tuple(kw["hidden"] or ())
        kw.setdefault("beta", self.eval.beta)
        kw.setdefault("group_size", min(self.sampling.k, 10) if self.sampling.k >= 2 else 2)
        return TrainConfig(**{**kw, "objective": objective, "seed": int(seed)})

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, d: Any, where: str) -> Any:
    """Build dataclass `cls` from a dict, recursively; unknown keys raise with their path."""
    if not isinstance(d, dict):
        raise QProbeError(f"{where}: expected a mapping, got {type(d).__name__}")
    flds = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(flds))
    if unknown:
        raise QProbeError(f"{where}: unknown key(s) {unknown}; known: {sorted(flds)}")
    kw = {}
    for name, value in d.items():
        sub = f"{where}.{name}"
        default = (
            flds[name].default_factory()
            if flds[name].default_factory is not dataclasses.MISSING
            else flds[name].default
        )  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            kw[name] = _build(type(default), value or {}, sub)
        elif cls is ExperimentConfig and name == "test":
            items = value if isinstance(value, list) else [value]
            kw[name] = [_build(DataConfig, v, f"{sub}[{i}]") for i, v in enumerate(items)]
        else:
            kw[name] = value
    return cls(**kw)


def config_from_dict(d: dict[str, Any], where: str = "experiment") -> ExperimentConfig:
    """An ExperimentConfig from a (YAML-loaded) dict; validated."""
    cfg = _build(ExperimentConfig, d, where)
    try:
        cfg.validate()
    except QProbeError as e:
        raise QProbeError(f"{where}: {e}") from None
    return cfg


def apply_overrides(d: dict[str, Any], sets: list[str], where: str = "--set") -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as YAML) to a config dict, in place."""
    import yaml

    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise QProbeError(f"{where}: expected KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise QProbeError(f"{where}: cannot parse the value of {item!r}") from None
        node = d
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise QProbeError(f"{where}: {key!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return d


def load_config(path: str | os.PathLike, sets: list[str] | None = None) -> ExperimentConfig:
    """Read an experiment YAML file; `sets` are `dotted.key=value` overrides."""
    import yaml

    p = Path(path)
    try:
        d = yaml.safe_load(p.read_text())
    except OSError as e:
        raise QProbeError(f"{p}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise QProbeError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise QProbeError(f"{p}: expected a mapping at the top level")
    d.setdefault("name", p.stem)
    apply_overrides(d, sets or [])
    return config_from_dict(d, str(p))
