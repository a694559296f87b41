"""Running an experiment: one function per stage, called in order by `run_experiment`.

1. collect    k samples per prompt of the train split and of every test set (rollouts folders,
              resumable shard by shard), scored by the task's reward;
2. baselines  greedy decoding and few-shot on successes on every test set (`baselines`);
3. probes     one probe per objective x seed on all train rollouts (`qprobe.train`);
4. evaluate   pass@1, pass@k and every probe at each k x beta on every test set
              (`qprobe.evaluate`), then the learning curve (`curve`);
5. report     results.md + results.json + PNG plots (`report`).

Every stage reads what the previous one left in the output folder, so a rerun or a crashed run
resumes: rollouts already on disk are not sampled again.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.errors import QProbeError
from qprobe.experiment.baselines import (
    baseline_entry,
    collect_with_prefix,
    few_shot_prefix,
    pick_shots,
)
from qprobe.experiment.config import DataConfig, ExperimentConfig
from qprobe.experiment.curve import learning_curve


class Log:
    """Progress lines with elapsed time, to stdout (or a given function)."""

    def __init__(self, say: Any = None) -> None:
        self.t0 = time.perf_counter()
        self.say = say or (lambda s: print(s, flush=True))

    def __call__(self, msg: str) -> None:
        self.say(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}")


@dataclass
class Context:
    """What every stage needs: the config, the loaded model and its features, the log."""

    cfg: ExperimentConfig
    model: Any  # a LanguageModel with features
    spec: Any  # its FeatureSpec
    say: Log
    limit: int | None = None  # cap on every prompt set (smoke runs)
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.cfg.out_dir

    def lim(self, d: DataConfig) -> int | None:
        """The prompt limit of a set: the smaller of its own and the run's."""
        vals = [v for v in (d.limit, self.limit) if v is not None]
        return min(vals) if vals else None

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - t


@dataclass
class Baselines:
    """Where the baseline rollouts of each test set are, and the few-shot examples used."""

    greedy: dict[str, Path] = field(default_factory=dict)  # test label -> rollouts folder
    few_shot: dict[str, Path] = field(default_factory=dict)
    shots: list[tuple[str, str]] = field(default_factory=list)


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
    t_start = time.perf_counter()
    say = log if isinstance(log, Log) else Log(log)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    ctx = start(cfg, say, model, limit, progress)
    with ctx.timed("collect_s"):
        train_dir, test_dirs = collect_sets(ctx)
    with ctx.timed("baselines_s"):
        base = collect_baselines(ctx, train_dir)
    with ctx.timed("train_s"):
        train, probes = train_probes(ctx, train_dir)
    with ctx.timed("evaluate_s"):
        results: dict[str, Any] = {"test": {}}
        for ts in cfg.test:
            results["test"][ts.label] = evaluate_test_set(ctx, ts, test_dirs[ts.label], probes, base)
            say(f"evaluated {ts.label}")
        if cfg.curve.sizes:  # the learning curve (figure 2) on the first test set
            first_test = _rollouts(test_dirs[cfg.test[0].label])
            results["curve"] = learning_curve(cfg, train.features, train.rewards, train.group,
                                              len(train.prompts), first_test, ctx.spec, say)  # fmt: skip
    ctx.timings["total_s"] = time.perf_counter() - t_start
    return write_results(ctx, results, train_dir, train)


# ---------------------------------------------------------------- 0. the model


def start(
    cfg: ExperimentConfig, say: Log, model: Any, limit: int | None, progress: bool
) -> Context:
    """Load the model (unless given) and check that it gives features."""
    if model is None:
        from qprobe.backends import load_model

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
    return Context(cfg, model, spec, say, limit, progress)


# ---------------------------------------------------------------- 1. collect


def _fmt_reward(x: float | None) -> str:
    return "n/a (not scored)" if x is None else f"{x:.3f}"


def collect_set(ctx: Context, d: DataConfig, out_dir: Path, k: int, temperature: float,
                top_p: float) -> None:
    """k samples per prompt of one prompt set, through `qprobe.collect` (resumable)."""
    from qprobe.collect import CollectConfig, collect

    cfg, spec, s = ctx.cfg, ctx.spec, ctx.cfg.sampling
    ctx.say(f"collect {out_dir.name}: {d.task}/{d.split}, k={k}, temperature={temperature}")
    ccfg = CollectConfig(
        out=str(out_dir), task=d.task, split=d.split, k=k, limit=ctx.lim(d),
        max_new_tokens=s.max_new_tokens, temperature=temperature, top_p=top_p,
        seed=cfg.seed, layer=spec.layer, position=spec.position, chat=cfg.model.chat,
        feature_dtype=spec.dtype, progress=ctx.progress,
    )  # fmt: skip
    summary = collect(ccfg, lm=ctx.model)
    if summary["new_rows"] == 0:
        ctx.say(f"{out_dir.name}: {summary['prompts']} prompts x {k} already collected")
    else:
        ctx.say(f"{out_dir.name}: {summary['new_rows']} new samples in "
                f"{summary['seconds']:.0f}s, mean reward {_fmt_reward(summary['mean_reward'])}")  # fmt: skip


def collect_sets(ctx: Context) -> tuple[Path, dict[str, Path]]:
    """k samples per prompt of the train set and every test set; their rollouts folders."""
    s, rollouts = ctx.cfg.sampling, ctx.out / "rollouts"
    train_dir = rollouts / "train"
    collect_set(ctx, ctx.cfg.train, train_dir, s.k, s.temperature, s.top_p)
    test_dirs = {}
    for ts in ctx.cfg.test:
        test_dirs[ts.label] = rollouts / ts.label
        collect_set(ctx, ts, test_dirs[ts.label], s.k, s.temperature, s.top_p)
    return train_dir, test_dirs


# ---------------------------------------------------------------- 2. baselines


def collect_baselines(ctx: Context, train_dir: Path) -> Baselines:
    """Greedy and few-shot completions of every test set (one per prompt, resumable)."""
    from qprobe.backends import SamplingParams
    from qprobe.tasks import get_task

    cfg, rollouts = ctx.cfg, ctx.out / "rollouts"
    base = Baselines()
    if cfg.baselines.few_shot > 0:
        base.shots = pick_shots(train_dir, cfg.baselines.few_shot, cfg.seed)
        if len(base.shots) < cfg.baselines.few_shot:
            ctx.say(f"few-shot: only {len(base.shots)} successful train completions available")
    tasks: dict[str, Any] = {}  # name -> task, shared by the test sets of one task
    try:
        for ts in cfg.test:
            if cfg.baselines.greedy:
                base.greedy[ts.label] = rollouts / f"greedy-{ts.label}"
                collect_set(ctx, ts, base.greedy[ts.label], 1, 0.0, 1.0)
            if base.shots:
                if ts.task not in tasks:
                    tasks[ts.task] = get_task(ts.task)
                task = tasks[ts.task]
                base.few_shot[ts.label] = rollouts / f"fewshot-{ts.label}"
                greedy = SamplingParams(temperature=0.0, top_p=1.0,
                                        max_new_tokens=cfg.sampling.max_new_tokens,
                                        stop=list(task.stop), seed=cfg.seed)  # fmt: skip
                collect_with_prefix(ctx.model, task, ts.split, base.few_shot[ts.label], greedy,
                                    ctx.lim(ts), few_shot_prefix(base.shots), ctx.say)  # fmt: skip
    finally:
        for task in tasks.values():
            task.close()
    return base


# ---------------------------------------------------------------- 3. probes


@dataclass
class TrainSet:
    """The train rollouts as arrays: features [N, D], rewards [N], group [N] (prompt index)."""

    features: np.ndarray
    rewards: np.ndarray
    group: np.ndarray
    prompts: list[str]  # group index -> prompt id
    prompt_ids: Any  # [N]
    n_samples: int


def _rollouts(path: Path) -> Any:
    from qprobe.rollouts import Rollouts

    return Rollouts(path)


def train_probes(ctx: Context, train_dir: Path) -> tuple[TrainSet, dict[tuple[str, int], Any]]:
    """One probe per objective x seed on all train rollouts, saved to probes/<obj>-seed<seed>."""
    from qprobe.train import train_probe

    tr = _rollouts(train_dir)
    group, prompts = tr.groups()
    train = TrainSet(np.asarray(tr.features), tr.rewards, group, prompts, tr.prompt_ids, len(tr))
    probes: dict[tuple[str, int], Any] = {}
    for obj in ctx.cfg.probes.objectives:
        for seed in ctx.cfg.probes.seeds:
            probe, _hist = train_probe(
                train.features,
                train.rewards,
                train.group,
                config=ctx.cfg.train_config(obj, seed),
                feature_spec=ctx.spec,
                prompt_ids=train.prompt_ids,
            )
            probe.save(ctx.out / "probes" / f"{obj}-seed{seed}")
            probes[(obj, seed)] = probe
            ctx.say(f"trained probe {obj} seed {seed}")
    return train, probes


# ---------------------------------------------------------------- 4. evaluate


def evaluate_test_set(ctx: Context, ts: DataConfig, test_dir: Path,
                      probes: dict[tuple[str, int], Any], base: Baselines) -> dict[str, Any]:
    """pass@1, pass@k, the baselines and every probe on one test set (results.json's entry)."""
    from qprobe.evaluate import evaluate_groups

    cfg, ev = ctx.cfg, ctx.cfg.eval
    te = _rollouts(test_dir)
    group, _prompts = te.groups()
    feats = np.asarray(te.features)  # [N, D]
    rewards = te.rewards  # [N]
    res = evaluate_groups(group, rewards, None, ev.ks, [], n_boot=ev.n_boot, seed=cfg.seed)
    entry: dict[str, Any] = {
        "n_prompts": res.n_prompts,
        "n_samples": res.n_samples,
        "pass@1": dataclasses.asdict(res.pass1),
        "pass@k": {str(k): dataclasses.asdict(e) for k, e in res.pass_at_k.items()},
        "notes": res.notes,
    }
    n_shots, wanted = len(base.shots), cfg.baselines.few_shot
    if 0 < n_shots < wanted or (wanted and not n_shots):
        entry["notes"].append(
            f"few-shot baseline: only {n_shots} successful train completion(s) of {wanted} "
            "wanted" + ("; baseline skipped" if not n_shots else "")
        )
    if ts.label in base.greedy:
        entry["greedy"] = baseline_entry(base.greedy[ts.label], ev.n_boot, cfg.seed)
    if ts.label in base.few_shot:
        entry["few_shot"] = baseline_entry(base.few_shot[ts.label], ev.n_boot, cfg.seed)
        entry["few_shot"]["shots"] = n_shots
    entry["probes"] = {}
    scores_by: dict[str, list[np.ndarray]] = {}
    for obj in cfg.probes.objectives:
        scores = [probes[(obj, seed)].score(feats).astype(np.float64) for seed in cfg.probes.seeds]
        entry["probes"][obj] = evaluate_probe(ctx, group, rewards, scores)
        scores_by[obj] = scores
    entry["_scores"] = scores_by  # for the plots; dropped from results.json
    entry["_rewards"] = rewards
    return entry


def evaluate_probe(ctx: Context, group: np.ndarray, rewards: np.ndarray,
                   scores: list[np.ndarray]) -> dict[str, Any]:
    """One objective's probes (one score array [N] per seed): every k x beta per seed, and the
    headline (max k, beta) averaged over seeds with CIs over prompts."""
    from qprobe.evaluate import Estimate, evaluate_groups, ranking

    ev, seed0 = ctx.cfg.eval, ctx.cfg.seed
    runs, headline_vals, base_vals, ranks = {}, [], None, []
    for seed, sc in zip(ctx.cfg.probes.seeds, scores):
        ranks.append(ranking(group, rewards, sc))
        res = evaluate_groups(group, rewards, sc, ev.ks, ev.betas, n_boot=ev.n_boot, seed=seed0,
                              keep_values=True)  # fmt: skip
        runs[str(seed)] = res.to_dict()
        headline_vals.append(res.values[(max(ev.ks), ev.beta)])
        base_vals = res.base_values[max(ev.ks)]
    vals = np.mean(headline_vals, axis=0)  # [P] per-prompt reward, averaged over seeds
    seed_means = [float(v.mean()) for v in headline_vals]
    return {
        "k": max(ev.ks),
        "beta": ev.beta,
        "mean_over_seeds": dataclasses.asdict(Estimate.of(vals, ev.n_boot, seed0)),
        "gain_over_pass@1": dataclasses.asdict(Estimate.of(vals - base_vals, ev.n_boot, seed0)),
        "seed_means": seed_means,
        "seed_std": float(np.std(seed_means)),
        "ranking": _mean_ranking(ranks),
        "runs": runs,
    }


def _mean_ranking(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """`qprobe.evaluate.ranking` of each seed's probe, averaged over the seeds."""
    out: dict[str, Any] = {"prompts_with_differing_rewards": ranks[0]["prompts_with_differing_rewards"]}
    for key in ("within_prompt", "pooled_auc"):
        vals = [r[key] for r in ranks if r[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
    return out


# ---------------------------------------------------------------- 5. report


def write_results(ctx: Context, results: dict[str, Any], train_dir: Path,
                  train: TrainSet) -> dict[str, Any]:
    """Add the run's description to `results` and write the report folder."""
    from qprobe.experiment.report import write_report

    results.update(
        {
            "name": ctx.cfg.name,
            "config": ctx.cfg.to_dict(),
            "feature_spec": ctx.spec.to_dict(),
            "train": {
                "rollouts": str(train_dir),
                "n_prompts": len(train.prompts),
                "n_samples": train.n_samples,
            },
            "timings": ctx.timings,
        }
    )
    report_dir = write_report(results, ctx.out / "report")
    results["report"] = str(report_dir)
    ctx.say(f"report: {report_dir}")
    return results
