"""A whole Q-probe experiment from one YAML file: `qprobe run EXPERIMENT.yaml`.

Stages (each cached in the output folder, so a rerun or a crashed run resumes):

1. collect   k samples per prompt of the train split and of every test set (rollouts folders,
             resumable shard by shard), scored by the task's reward;
2. baselines greedy decoding on every test set, and "5-shot on successes": 5 successful train
             completions put before the test prompt, decoded greedily;
3. probes    one probe per objective x seed on all train rollouts (trainer: `qprobe.train`);
4. evaluate  pass@1, pass@k, every probe at each k x beta (`qprobe.evaluate`), and the learning
             curve: probes trained on random subsets of the train prompts (10 per size);
5. report    results.md + results.json + PNG plots (`qprobe.report`).

The config is a tree of dataclasses (`ExperimentConfig`); the YAML mirrors it, unknown keys are
refused with the key's path. See experiments/*.yaml and docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.errors import QProbeError

# --------------------------------------------------------------------------------------------
# config


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
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass"})
    max_new_tokens: int = field(default=256, metadata={"help": "tokens per completion"})


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


@dataclass
class CurveConfig:
    """Reward vs number of training prompts (paper figure 2)."""

    sizes: list[int] = field(
        default_factory=list,
        metadata={"help": "numbers of training prompts (empty: no learning curve)"},
    )
    subsets: int = field(default=10, metadata={"help": "random prompt subsets per size"})
    objective: str = field(default="pg", metadata={"help": "objective of the curve's probes"})


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


# --------------------------------------------------------------------------------------------
# running


class Log:
    """Progress lines with elapsed time, to stdout (or a given function)."""

    def __init__(self, say: Any = None) -> None:
        self.t0 = time.perf_counter()
        self.say = say or (lambda s: print(s, flush=True))

    def __call__(self, msg: str) -> None:
        self.say(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}")


def _fmt_reward(x: float | None) -> str:
    return "n/a (not scored)" if x is None else f"{x:.3f}"


def run_experiment(
    cfg: ExperimentConfig,
    limit: int | None = None,
    log: Any = None,
    model: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) an experiment; returns the results dict also written to results.json.

    limit: cap every prompt set at this many prompts (smoke runs). model: an already loaded
    `LanguageModel` (tests); otherwise `cfg.model` is loaded. progress: tqdm bars on stderr.
    """
    from qprobe.backends import SamplingParams, load_model
    from qprobe.tasks import get_task

    say = log if isinstance(log, Log) else Log(log)
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def lim(d: DataConfig) -> int | None:
        vals = [v for v in (d.limit, limit) if v is not None]
        return min(vals) if vals else None

    if model is None:
        say(f"loading model {cfg.model.name}")
        model = load_model(
            cfg.model.name,
            layer=cfg.model.layer,
            position=cfg.model.position,
            chat=cfg.model.chat,
            max_batch_rows=cfg.model.max_batch_rows,
        )
    spec = model.feature_spec
    if spec is None:
        raise QProbeError(f"model {cfg.model.name!r} gives no features; a local model is needed")
    say(f"model {spec.model} layer {spec.layer} ({spec.position}), dim {spec.dim}")

    tasks: dict[str, Any] = {}

    def task_of(name: str) -> Any:
        if name not in tasks:
            tasks[name] = get_task(name)
        return tasks[name]

    s = cfg.sampling

    def collect_set(d: DataConfig, out_dir: Path, k: int, temperature: float, top_p: float) -> None:
        """k samples per prompt of one prompt set, through `qprobe.collect` (resumable)."""
        from qprobe.collect import CollectConfig, collect

        say(f"collect {out_dir.name}: {d.task}/{d.split}, k={k}, temperature={temperature}")
        ccfg = CollectConfig(
            out=str(out_dir), task=d.task, split=d.split, k=k, limit=lim(d),
            max_new_tokens=s.max_new_tokens, temperature=temperature, top_p=top_p,
            seed=cfg.seed, layer=spec.layer, position=spec.position, chat=cfg.model.chat,
            feature_dtype=spec.dtype, progress=progress,
        )  # fmt: skip
        summary = collect(ccfg, lm=model)
        if summary["new_rows"] == 0:
            say(f"{out_dir.name}: {summary['prompts']} prompts x {k} already collected")
        else:
            say(f"{out_dir.name}: {summary['new_rows']} new samples in "
                f"{summary['seconds']:.0f}s, mean reward {_fmt_reward(summary['mean_reward'])}")  # fmt: skip

    try:
        # 1. collect ---------------------------------------------------------------------
        t = time.perf_counter()
        train_dir = out / "rollouts" / "train"
        collect_set(cfg.train, train_dir, s.k, s.temperature, s.top_p)
        test_dirs = {}
        for ts in cfg.test:
            test_dirs[ts.label] = out / "rollouts" / ts.label
            collect_set(ts, test_dirs[ts.label], s.k, s.temperature, s.top_p)
        timings["collect_s"] = time.perf_counter() - t

        # 2. baselines -------------------------------------------------------------------
        t = time.perf_counter()
        greedy_dirs, fewshot_dirs = {}, {}
        shots = []
        if cfg.baselines.few_shot > 0:
            shots = pick_shots(train_dir, cfg.baselines.few_shot, cfg.seed)
            if len(shots) < cfg.baselines.few_shot:
                say(f"few-shot: only {len(shots)} successful train completions available")
        for ts in cfg.test:
            if cfg.baselines.greedy:
                greedy_dirs[ts.label] = out / "rollouts" / f"greedy-{ts.label}"
                collect_set(ts, greedy_dirs[ts.label], 1, 0.0, 1.0)
            if shots:
                task = task_of(ts.task)
                fewshot_dirs[ts.label] = out / "rollouts" / f"fewshot-{ts.label}"
                greedy = SamplingParams(temperature=0.0, top_p=1.0,
                                        max_new_tokens=s.max_new_tokens, stop=list(task.stop),
                                        seed=cfg.seed)  # fmt: skip
                collect_with_prefix(model, task, ts.split, fewshot_dirs[ts.label], greedy,
                                    lim(ts), few_shot_prefix(shots), say)  # fmt: skip
        timings["baselines_s"] = time.perf_counter() - t
    finally:
        for task in tasks.values():
            task.close()

    # 3. probes ------------------------------------------------------------------------------
    from qprobe.rollouts import Rollouts
    from qprobe.train import train_probe

    t = time.perf_counter()
    tr = Rollouts(train_dir)
    tr_group, tr_prompts = tr.groups()
    tr_feats = np.asarray(tr.features)
    tr_rewards = tr.rewards
    probes: dict[tuple[str, int], Any] = {}
    for obj in cfg.probes.objectives:
        for seed in cfg.probes.seeds:
            probe, _hist = train_probe(
                tr_feats,
                tr_rewards,
                tr_group,
                config=cfg.train_config(obj, seed),
                feature_spec=spec,
                prompt_ids=tr.prompt_ids,
            )
            probe.save(out / "probes" / f"{obj}-seed{seed}")
            probes[(obj, seed)] = probe
            say(f"trained probe {obj} seed {seed}")
    timings["train_s"] = time.perf_counter() - t

    # 4. evaluate ----------------------------------------------------------------------------
    from qprobe.evaluate import Estimate, evaluate_groups, ranking

    t = time.perf_counter()
    results: dict[str, Any] = {"test": {}}
    ev = cfg.eval
    for ts in cfg.test:
        te = Rollouts(test_dirs[ts.label])
        group, prompts = te.groups()
        feats = np.asarray(te.features)
        rewards = te.rewards
        base = evaluate_groups(group, rewards, None, ev.ks, [], n_boot=ev.n_boot, seed=cfg.seed)
        entry: dict[str, Any] = {
            "n_prompts": base.n_prompts,
            "n_samples": base.n_samples,
            "pass@1": dataclasses.asdict(base.pass1),
            "pass@k": {str(k): dataclasses.asdict(e) for k, e in base.pass_at_k.items()},
            "notes": base.notes,
        }
        if 0 < len(shots) < cfg.baselines.few_shot or (cfg.baselines.few_shot and not shots):
            entry["notes"].append(
                f"few-shot baseline: only {len(shots)} successful train completion(s) of "
                f"{cfg.baselines.few_shot} wanted" + ("; baseline skipped" if not shots else "")
            )
        if ts.label in greedy_dirs:
            entry["greedy"] = _baseline_entry(greedy_dirs[ts.label], ev.n_boot, cfg.seed)
        if ts.label in fewshot_dirs:
            entry["few_shot"] = _baseline_entry(fewshot_dirs[ts.label], ev.n_boot, cfg.seed)
            entry["few_shot"]["shots"] = len(shots)
        entry["probes"] = {}
        scores_by: dict[str, list[np.ndarray]] = {}
        for obj in cfg.probes.objectives:
            runs, headline_vals, base_vals, ranks = {}, [], None, []
            for seed in cfg.probes.seeds:
                sc = probes[(obj, seed)].score(feats).astype(np.float64)  # [N]
                scores_by.setdefault(obj, []).append(sc)
                ranks.append(ranking(group, rewards, sc))
                res = evaluate_groups(
                    group,
                    rewards,
                    sc,
                    ev.ks,
                    ev.betas,
                    n_boot=ev.n_boot,
                    seed=cfg.seed,
                    keep_values=True,
                )
                runs[str(seed)] = res.to_dict()
                headline_vals.append(res.values[(max(ev.ks), ev.beta)])
                base_vals = res.base_values[max(ev.ks)]
            vals = np.mean(headline_vals, axis=0)  # [P] per-prompt reward, averaged over seeds
            seed_means = [float(v.mean()) for v in headline_vals]
            entry["probes"][obj] = {
                "k": max(ev.ks),
                "beta": ev.beta,
                "mean_over_seeds": dataclasses.asdict(Estimate.of(vals, ev.n_boot, cfg.seed)),
                "gain_over_pass@1": dataclasses.asdict(
                    Estimate.of(vals - base_vals, ev.n_boot, cfg.seed)
                ),
                "seed_means": seed_means,
                "seed_std": float(np.std(seed_means)),
                "ranking": _mean_ranking(ranks),
                "runs": runs,
            }
        entry["_scores"] = scores_by  # for the plots; dropped from results.json
        entry["_rewards"] = rewards
        results["test"][ts.label] = entry
        say(f"evaluated {ts.label}")

    # learning curve (figure 2) on the first test set
    if cfg.curve.sizes:
        results["curve"] = learning_curve(
            cfg,
            tr_feats,
            tr_rewards,
            tr_group,
            len(tr_prompts),
            Rollouts(test_dirs[cfg.test[0].label]),
            spec,
            say,
        )
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    # 5. report ------------------------------------------------------------------------------
    from qprobe.report import write_report

    results.update(
        {
            "name": cfg.name,
            "config": cfg.to_dict(),
            "feature_spec": spec.to_dict(),
            "train": {
                "rollouts": str(train_dir),
                "n_prompts": len(tr_prompts),
                "n_samples": len(tr),
            },
            "timings": timings,
        }
    )
    report_dir = write_report(results, out / "report")
    results["report"] = str(report_dir)
    say(f"report: {report_dir}")
    return results


def _mean_ranking(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """`qprobe.evaluate.ranking` of each seed's probe, averaged over the seeds."""
    out: dict[str, Any] = {"prompts_with_differing_rewards": ranks[0]["prompts_with_differing_rewards"]}
    for key in ("within_prompt", "pooled_auc"):
        vals = [r[key] for r in ranks if r[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
    return out


def _baseline_entry(path: Path, n_boot: int, seed: int) -> dict[str, Any]:
    from qprobe.evaluate import Estimate
    from qprobe.rollouts import Rollouts

    r = Rollouts(path).rewards
    r = r[~np.isnan(r)].astype(np.float64)
    return dataclasses.asdict(Estimate.of(r, n_boot, seed))


def learning_curve(
    cfg: ExperimentConfig,
    feats: np.ndarray,
    rewards: np.ndarray,
    group: np.ndarray,
    n_prompts: int,
    test: Any,
    spec: Any,
    say: Any,
) -> dict[str, Any]:
    """Reward at (k, beta) of probes trained on `subsets` random prompt subsets of each size."""
    from qprobe.evaluate import evaluate_groups
    from qprobe.train import train_probe

    k, beta = max(cfg.eval.ks), cfg.eval.beta
    te_group, _ = test.groups()
    te_feats, te_rewards = np.asarray(test.features), test.rewards
    rng = np.random.default_rng([cfg.seed, 2])
    out: dict[str, Any] = {"objective": cfg.curve.objective, "k": k, "beta": beta, "sizes": {}}
    for size in cfg.curve.sizes:
        if size > n_prompts:
            say(f"curve: size {size} > {n_prompts} train prompts, skipped")
            continue
        vals = []
        for j in range(cfg.curve.subsets):
            chosen = rng.choice(n_prompts, size=size, replace=False)
            rows = np.flatnonzero(np.isin(group, chosen))
            probe, _ = train_probe(
                feats[rows],
                rewards[rows],
                group[rows],
                config=cfg.train_config(cfg.curve.objective, j),
                feature_spec=spec,
                data_fingerprint=False,
            )
            sc = probe.score(te_feats).astype(np.float64)
            res = evaluate_groups(te_group, te_rewards, sc, [k], [beta], n_boot=10, seed=cfg.seed)
            vals.append(res.probe[(k, beta)].mean)
        out["sizes"][str(size)] = vals
        say(f"curve: {size} train prompts -> {np.mean(vals):.3f} (+- {np.std(vals):.3f})")
    return out


# --------------------------------------------------------------------------------------------
# collection helpers


def pick_shots(train_dir: Path, n: int, seed: int) -> list[tuple[str, str]]:
    """n (prompt, completion) pairs with the best reward, from distinct train prompts (seeded)."""
    from qprobe.rollouts import Rollouts

    r = Rollouts(train_dir)
    rewards = r.rewards
    if np.isnan(rewards).all():
        return []
    best = np.nanmax(rewards)
    if best <= 0:
        return []
    ok = np.flatnonzero(rewards == best)
    rng = np.random.default_rng([seed, 1])
    pids, prompts, comps = r.prompt_ids, r.column("prompt"), r.column("completion")
    shots, seen = [], set()
    for i in rng.permutation(ok):
        if pids[i] in seen:
            continue
        seen.add(pids[i])
        shots.append((prompts[i], comps[i]))
        if len(shots) == n:
            break
    return shots


def few_shot_prefix(shots: list[tuple[str, str]]) -> str:
    """Text put before a test prompt: each solved example as prompt, newline, completion."""
    return "".join(f"{p.rstrip()}\n{c.strip()}\n\n" for p, c in shots)


def collect_with_prefix(
    model: Any,
    task: Any,
    split: str,
    out_dir: Path,
    params: Any,
    limit: int | None,
    prefix: str,
    say: Any,
) -> None:
    """One completion per prompt with `prefix` put before the prompt (the few-shot baseline).

    `qprobe.collect` samples a task's own prompts; this is the same loop (resumable, one shard
    per batch, scored by the task against the original prompt) for prompts with a prefix.
    """
    from qprobe.rollouts import RolloutWriter

    rows = task.prompts(split, limit=limit)
    meta = {"task": task.name, "split": split, "k": 1, "sampling": params.to_dict(),
            "prefix": prefix, "model": getattr(model, "name", "")}  # fmt: skip
    w = RolloutWriter(out_dir, meta=meta, feature_spec=model.feature_spec)
    todo = [r for r in rows if (str(r["id"]), 0) not in w.done]
    if not todo:
        say(f"{out_dir.name}: {len(rows)} prompts x 1 already collected")
        return
    t0 = time.perf_counter()
    per_batch = max(1, min(128, getattr(model, "max_batch_rows", 16)))  # one row per prompt
    for i in range(0, len(todo), per_batch):
        chunk = todo[i : i + per_batch]
        samples = model.sample([prefix + r["prompt"] for r in chunk], 1, params)
        out_rows = [
            {"prompt_id": str(r["id"]), "sample_idx": 0, "prompt": r["prompt"],
             "completion": g[0].text, "finish_reason": g[0].finish_reason}
            for r, g in zip(chunk, samples)
        ]  # fmt: skip
        columns = {c: [r.get(c) for r in chunk] for c in chunk[0] if c not in ("id", "prompt")}
        rewards = task.reward([r["prompt"] for r in chunk], [o["completion"] for o in out_rows],
                              prompt_id=[o["prompt_id"] for o in out_rows], **columns)  # fmt: skip
        for o, rew in zip(out_rows, rewards):
            o["reward"] = None if rew is None else float(rew)
        feats = None if model.feature_spec is None else np.stack([g[0].feature for g in samples])
        w.append(out_rows, feats)
    say(f"{out_dir.name}: {len(todo)} prompts in {time.perf_counter() - t0:.0f}s")
