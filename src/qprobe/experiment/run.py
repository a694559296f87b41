"""Running an experiment: one function per stage, called in order by `run_experiment`.

1. collect    k samples per prompt of the train split and of every test set (rollouts folders,
              resumable shard by shard), scored by the task's reward;
2. baselines  greedy decoding and few-shot on successes on every test set (`baselines`);
              with `baselines.vote`, each sample's answer as its `exec_sig` (the votes);
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
from qprobe.experiment.report import cv_score


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
    chosen: dict[str, Any] = field(default_factory=dict)  # objective -> the CV-chosen Candidate

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
    policies: dict[str, dict[str, Path]] = field(default_factory=dict)  # name -> label -> folder


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
    with _executor(cfg):
        with ctx.timed("collect_s"):
            train_dir, test_dirs = collect_sets(ctx)
        with ctx.timed("baselines_s"):
            base = collect_baselines(ctx, train_dir)
        if cfg.policies:
            with ctx.timed("policies_s"):
                base.policies = collect_policies(ctx)
    if cfg.baselines.visible:
        with ctx.timed("visible_s"):
            visible_sets(ctx, [(train_dir, cfg.train)]
                         + [(test_dirs[ts.label], ts) for ts in cfg.test]
                         + [(base.greedy[ts.label], ts) for ts in cfg.test if ts.label in base.greedy])
    if cfg.baselines.vote:
        with ctx.timed("answers_s"):
            answer_sets(ctx, [(train_dir, cfg.train)] + [(test_dirs[ts.label], ts) for ts in cfg.test])
    if cfg.embed.enabled:
        with ctx.timed("embed_s"):
            embed_sets(ctx, [train_dir, *test_dirs.values(), *base.greedy.values()])
    with ctx.timed("train_s"):
        train, probes = train_probes(ctx, train_dir)
    with ctx.timed("evaluate_s"):
        results: dict[str, Any] = {"test": {}}
        for ts in cfg.test:
            results["test"][ts.label] = evaluate_test_set(ctx, ts, test_dirs[ts.label], probes, base)
            say(f"evaluated {ts.label}")
        if cfg.curve.sizes or cfg.curve.samples:  # learning curves on the first test set
            results["curve"] = curve_stage(ctx, train_dir, test_dirs[cfg.test[0].label])
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


@contextmanager
def _executor(cfg: ExperimentConfig) -> Iterator[None]:
    """With executor.kind ray: one Ray connection for every collection of the run."""
    if cfg.executor.kind != "ray":
        yield
        return
    from qprobe.collect.ray import ray_session

    with ray_session(cfg.executor.address):
        yield


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
    ex = cfg.executor
    if ex.kind == "ray":  # the actors load the model by name, with the driver's batch size
        ccfg = dataclasses.replace(
            ccfg, executor="ray", model=cfg.model.name, ray=ex.ray_knobs(),
            batch_prompts=max(1, ctx.model.max_batch_rows // k))  # fmt: skip
    summary = collect(ccfg, lm=ctx.model, say=ctx.say)
    lim = ctx.lim(d)
    if lim is not None and summary["stored_prompts"] > lim:  # later stages read the whole folder
        raise QProbeError(
            f"{out_dir}: holds {summary['stored_prompts']} prompts, more than the limit {lim} of "
            f"{d.task}/{d.split}; raise the limit or use another --out")
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
    from qprobe.rollouts import read_meta
    from qprobe.tasks import get_task

    cfg, rollouts = ctx.cfg, ctx.out / "rollouts"
    base = Baselines()
    if cfg.baselines.few_shot > 0:  # a resumed run keeps the shots its folders were made with
        stored = [read_meta(p).get("prefix") for p in (rollouts / f"fewshot-{ts.label}" for ts in cfg.test)
                  if (p / "meta.json").is_file()]
        base.shots = pick_shots(train_dir, cfg.baselines.few_shot, cfg.seed,
                                stored[0] if stored else None)
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


# ---------------------------------------------------------------- 2b. the YAML's policies


def collect_policies(ctx: Context) -> dict[str, dict[str, Path]]:
    """One answer per test prompt from each policy of `policies:` (built by the policy registry
    over the run's model), stored as rollouts folders through the collection loop (resumable,
    scored by the task), with the run's sampling settings and seed."""
    from qprobe.backends import SamplingParams
    from qprobe.collect import collect_task
    from qprobe.policy import registry
    from qprobe.policy.as_model import PolicyLanguageModel
    from qprobe.policy.loading import ModelContext
    from qprobe.tasks import get_task

    cfg, rollouts = ctx.cfg, ctx.out / "rollouts"
    mctx = ModelContext(cfg.model.name, chat=cfg.model.chat, loaded=ctx.model)
    out: dict[str, dict[str, Path]] = {}
    for name, spec in cfg.policies.items():
        policy = registry.build(spec, mctx)
        lm = PolicyLanguageModel(policy, f"policy:{name}:{spec}")
        out[name] = {}
        for ts in cfg.test:
            task = get_task(ts.task)
            try:
                params = SamplingParams(temperature=cfg.sampling.temperature,
                                        top_p=cfg.sampling.top_p,
                                        max_new_tokens=cfg.sampling.max_new_tokens,
                                        stop=list(task.stop), seed=cfg.seed)
                folder = rollouts / f"policy-{name}-{ts.label}"
                summary = collect_task(lm, task, ts.split, folder, k=1, params=params,
                                       limit=ctx.lim(ts), progress=False, say=ctx.say,
                                       batch_prompts=max(1, min(32, lm.max_batch_rows)))
            finally:
                task.close()
            ctx.say(f"policy {name} on {ts.label}: {summary['new_rows']} new answers, mean "
                    f"reward {_fmt_reward(summary['mean_reward'])}")
            out[name][ts.label] = folder
    return out


# ---------------------------------------------------------------- 2a. the prompts' shown tests


def visible_sets(ctx: Context, folders: list[tuple[Path, DataConfig]]) -> None:
    """A `visible_reward` value (`qprobe score --visible`) for every sample that lacks one.

    Only the rows of shards without the column are run: a folder that grew since the last run
    (a raised limit) gets its new shards filled, and the stored values stay as they are. A row
    left without a value would read as "the prompt shows no tests" (visible_pass 0.5)."""
    from qprobe.tasks import get_task
    from qprobe.tasks.code import CodeTask

    for folder, d in folders:
        r = _rollouts(folder)
        todo = np.flatnonzero(r.lacks_column("visible_reward"))  # [M] rows to run
        if len(todo) == 0:
            continue
        task = get_task(d.task)
        try:
            if not isinstance(task, CodeTask):
                raise QProbeError(f"baselines.visible: task {d.task!r} shows no tests (code tasks only)")
            t0 = time.perf_counter()
            prompts, comps, ids = r.column("prompt"), r.column("completion"), r.prompt_ids
            new = task.visible_reward([prompts[i] for i in todo], [comps[i] for i in todo],
                                      prompt_id=[str(ids[i]) for i in todo])
        finally:
            task.close()
        vis = r.column("visible_reward") if "visible_reward" in r.table.column_names else [None] * len(r)
        for i, v in zip(todo, new):
            vis[i] = v
        r.set_rewards([None if x != x else float(x) for x in r.rewards],
                      extra_columns={"visible_reward": vis})
        shown = [v for v in new if v is not None]
        ctx.say(f"{folder.name}: shown tests run on {len(new)} of {len(r)} samples in "
                f"{time.perf_counter() - t0:.0f}s ({len(shown)} with shown tests, pass rate "
                f"{_fmt_reward(sum(shown) / len(shown) if shown else None)})")


# ---------------------------------------------------------------- 2b. answers (votes)


def answer_sets(ctx: Context, folders: list[tuple[Path, DataConfig]]) -> None:
    """Each sample's answer as its `exec_sig` (`qprobe.verifier.signals.fill_answers`: the
    program run in the sandbox; only rows still without one), for the votes."""
    from qprobe.tasks import get_task
    from qprobe.verifier.signals import fill_answers

    for folder, d in folders:
        task = get_task(d.task)
        try:
            fill_answers(folder, task, say=ctx.say)
        finally:
            task.close()


# ---------------------------------------------------------------- 2c. re-encode


def embed_sets(ctx: Context, folders: list[Path]) -> None:
    """Log-likelihoods and feature sets for every folder (`qprobe embed`, resumable)."""
    from qprobe.backends.hf import HFLanguageModel
    from qprobe.embed import EmbedConfig, embed_rollouts

    m = ctx.model
    if not isinstance(m, HFLanguageModel):
        raise QProbeError("embed: the experiment's model must be a local transformers model")
    for folder in folders:
        e = ctx.cfg.embed
        embed_rollouts(EmbedConfig(rollouts=str(folder), layers=e.layers, positions=e.positions,
                                   progress=ctx.progress),
                       model_bundle=(m.model, m.tok.tokenizer, m.name), say=ctx.say)


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


PROBE_INPUTS = "inputs.json"  # beside the probes: what they were trained on (`probe_inputs`)


def _folder_inputs(r: Any) -> dict[str, Any]:
    """A rollouts folder as a stage's input: rows, columns, feature sets and a digest of the
    name, size and modification time of its data files (samples, features, pairs, embedded)."""
    import hashlib
    import json

    files = [[str(p.relative_to(r.path)), p.stat().st_size, p.stat().st_mtime_ns]
             for p in sorted(r.path.rglob("*")) if p.is_file() and p.suffix in (".parquet", ".npy")]
    return {"rows": len(r), "columns": r.table.column_names, "feature_sets": sorted(r.feature_sets),
            "files": hashlib.sha256(json.dumps(files).encode()).hexdigest()}


def probe_inputs(ctx: Context, tr: Any) -> dict[str, Any]:
    """Everything the probes are a function of: the train folder's rows, columns and files
    (name, size and modification time of every samples / features / pairs / embedded file: any
    new shard, re-scoring or filled column changes them), the feature spec, the probe and CV
    settings, the trainer config of each objective x seed, and the qprobe version."""
    import json

    from qprobe import __version__

    cfg = ctx.cfg
    d = {
        "qprobe": __version__,
        "train": _folder_inputs(tr),
        "feature_spec": ctx.spec.to_dict(),
        "probes": dataclasses.asdict(cfg.probes),
        "seed": cfg.seed,
        "visible": cfg.baselines.visible,
        "trainer": {f"{obj}-seed{seed}": dataclasses.asdict(cfg.train_config(obj, seed))
                    for obj in cfg.probes.objectives for seed in cfg.probes.seeds},
    }
    return json.loads(json.dumps(d, default=str))  # as read back from the file


def _stored_probes(ctx: Context, inputs: dict[str, Any]) -> dict[tuple[str, int], Any] | None:
    """The probes of an earlier run, if it trained them on the same `inputs`; else None."""
    import json

    from qprobe.probe import Probe

    d = ctx.out / "probes"
    try:
        if json.loads((d / PROBE_INPUTS).read_text()) != inputs:
            return None
        return {(obj, seed): Probe.load(d / f"{obj}-seed{seed}")
                for obj in ctx.cfg.probes.objectives for seed in ctx.cfg.probes.seeds}
    except (OSError, ValueError, QProbeError):
        return None


def train_probes(ctx: Context, train_dir: Path) -> tuple[TrainSet, dict[tuple[str, int], Any]]:
    """One probe per objective x seed on all train rollouts, saved to probes/<obj>-seed<seed>.

    Skipped when probes/inputs.json says the stored probes were trained on the same inputs
    (`probe_inputs`): they are loaded, with the candidate CV chose. Otherwise every probe is
    trained again and inputs.json is written last."""
    from qprobe.fileio import atomic_write_json
    from qprobe.train import train_probe

    tr = _rollouts(train_dir)
    group, prompts = tr.groups()
    train = TrainSet(np.asarray(tr.features), tr.rewards, group, prompts, tr.prompt_ids, len(tr))
    inputs = probe_inputs(ctx, tr)
    stored = _stored_probes(ctx, inputs)
    if stored is not None:
        for obj in ctx.cfg.probes.objectives:
            cv = stored[(obj, ctx.cfg.probes.seeds[0])].info.get("cv")
            if ctx.cfg.probes.cv and cv is not None:
                ctx.chosen[obj] = _chosen_candidate(cv)
        ctx.say(f"probes: train data and settings unchanged, {len(stored)} probes loaded")
        return train, stored
    (ctx.out / "probes" / PROBE_INPUTS).unlink(missing_ok=True)  # stale until all are retrained
    probes: dict[tuple[str, int], Any] = {}
    for obj in ctx.cfg.probes.objectives:
        chosen = choose_by_cv(ctx, tr, obj) if ctx.cfg.probes.cv else None
        if chosen is not None:
            ctx.chosen[obj] = chosen[0]
        for seed in ctx.cfg.probes.seeds:
            if chosen is None:
                probe, _hist = train_probe(
                    train.features,
                    train.rewards,
                    train.group,
                    config=ctx.cfg.train_config(obj, seed),
                    feature_spec=ctx.spec,
                    prompt_ids=train.prompt_ids,
                )
            else:
                from qprobe.train.cv import fit

                candidate, table = chosen
                probe, _hist = fit(tr, candidate, ctx.cfg.train_config(obj, seed))
                probe.info["cv"] = table
            probe.save(ctx.out / "probes" / f"{obj}-seed{seed}")
            probes[(obj, seed)] = probe
            ctx.say(f"trained probe {obj} seed {seed}")
    atomic_write_json(ctx.out / "probes" / PROBE_INPUTS, inputs)
    return train, probes


CURVE = "curve.json"  # beside the probes: the last learning curve and its inputs


def curve_stage(ctx: Context, train_dir: Path, test_dir: Path) -> dict[str, Any]:
    """The learning curve (`curve.learning_curve`), or the stored one when its inputs are the
    same: the probes' inputs, the first test folder, the curve and eval settings, and the
    candidate CV chose."""
    import json

    from qprobe.fileio import atomic_write_json

    cfg, tr, te = ctx.cfg, _rollouts(train_dir), _rollouts(test_dir)
    chosen = ctx.chosen.get(cfg.curve.objective)
    inputs = json.loads(json.dumps({
        "probes": probe_inputs(ctx, tr), "test": _folder_inputs(te),
        "curve": dataclasses.asdict(cfg.curve), "ks": cfg.eval.ks, "beta": cfg.eval.beta,
        "trainer": [dataclasses.asdict(cfg.train_config(cfg.curve.objective, j))
                    for j in range(cfg.curve.subsets)],
        "candidate": None if chosen is None else dataclasses.asdict(chosen)}, default=str))
    path = ctx.out / "probes" / CURVE
    try:
        stored = json.loads(path.read_text())
        if stored["inputs"] == inputs:
            ctx.say("curve: train and test data and settings unchanged, stored curve used")
            return stored["curve"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    curve = json.loads(json.dumps(learning_curve(cfg, tr, te, chosen, ctx.say), default=float))
    atomic_write_json(path, {"inputs": inputs, "curve": curve})
    return curve


def _chosen_candidate(cv: dict[str, Any]) -> Any:
    """The candidate a CV table (`cross_validate`'s result) ranks best."""
    from qprobe.train.cv import Candidate

    best = cv["rows"][cv["best"]]["candidate"]
    return Candidate(**{**best, "extras": tuple(best["extras"])})


def choose_by_cv(ctx: Context, tr: Any, obj: str) -> tuple[Any, dict[str, Any]]:
    """The candidate (inputs, regularisation) that cross-validation over the train prompts
    picks for one objective, and its table (stored in every seed's probe)."""
    from qprobe.train.cv import CVGrid, cross_validate

    grid = CVGrid(**ctx.cfg.probes.cv_grid)
    if not ctx.cfg.baselines.visible and "visible" not in ctx.cfg.probes.cv_grid:
        grid.visible = ["without"]  # a visible_reward column left by another run is not an input
    cv = cross_validate(tr, ctx.cfg.train_config(obj, ctx.cfg.seed), grid,
                        folds=ctx.cfg.probes.cv, seed=ctx.cfg.seed, log=ctx.say)
    best = cv["rows"][cv["best"]]
    c = _chosen_candidate(cv)
    ctx.say(f"cv {obj}: chose {c.label} ({best['mean']:.4f} +- {best['se']:.4f})")
    return c, {**cv, "chosen": c.label}


# ---------------------------------------------------------------- 4. evaluate


def evaluate_test_set(ctx: Context, ts: DataConfig, test_dir: Path,
                      probes: dict[tuple[str, int], Any], base: Baselines) -> dict[str, Any]:
    """pass@1, pass@k, the baselines and every probe on one test set (results.json's entry)."""
    from qprobe.evaluate import evaluate_groups

    cfg, ev = ctx.cfg, ctx.cfg.eval
    te = _rollouts(test_dir)
    group, _prompts = te.groups()
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
    ll = te.loglik()
    if cfg.baselines.rerank and ll is not None:
        for name, key in (("rerank_mean_logprob", "logprob_mean"), ("rerank_sum_logprob", "logprob_sum")):
            entry[name] = rerank_entry(ctx, group, rewards, ll[key])
    cols = te.extra_inputs()
    if cfg.baselines.visible and "visible_pass" in cols:
        entry["rerank_visible"] = rerank_entry(ctx, group, rewards, visible_score(cols))
    rules = free_rules(te, cols, ll) if cfg.baselines.rules else {}
    if cfg.baselines.vote:
        rules = {**vote_rules(cols, ll), **rules}
    if rules:
        from qprobe.evaluate import ranking

        entry["rules"] = {name: {**rerank_entry(ctx, group, rewards, sc),
                                 "ranking": ranking(group, rewards, sc)}
                          for name, sc in rules.items()}
    entry["probes"] = {}
    scores_by: dict[str, list[np.ndarray]] = {}
    greedy = _rollouts(base.greedy[ts.label]) if cfg.eval.with_greedy and ts.label in base.greedy else None
    for obj in cfg.probes.objectives:
        scores = [probes[(obj, seed)].score_rollouts(te).astype(np.float64) for seed in cfg.probes.seeds]
        beta = headline_beta(ctx, obj)
        entry["probes"][obj] = evaluate_probe(ctx, group, rewards, scores, beta)
        if greedy is not None:
            entry["probes"][obj]["with_greedy"] = with_greedy_entry(
                ctx, te, greedy, [probes[(obj, seed)] for seed in cfg.probes.seeds], scores, beta)
        if "majority_vote" in rules:
            entry["probes"][obj]["weighted_vote"] = weighted_vote_entry(
                ctx, te, rewards, scores, rules["majority_vote"])
        entry["probes"][obj]["paired"] = paired_gains(ctx, te, entry["probes"][obj]["_values"],
                                                      base, ts, ll, cols if cfg.baselines.visible else None,
                                                      rules)
        if "cv" in probes[(obj, cfg.probes.seeds[0])].info:
            cv = probes[(obj, cfg.probes.seeds[0])].info["cv"]
            entry["probes"][obj]["cv_chosen"] = cv["chosen"]
            entry["probes"][obj]["cv_score"] = cv_score(cv)
        scores_by[obj] = scores
    if base.policies:
        entry["policies"] = {name: policy_entry(ctx, name, te, folders[ts.label], base, ts, ll,
                                                cols if cfg.baselines.visible else None, rules)
                             for name, folders in base.policies.items()}
    entry["_scores"] = scores_by  # for the plots; dropped from results.json
    entry["_rewards"] = rewards
    return entry


def policy_entry(ctx: Context, name: str, te: Any, folder: Path, base: Baselines, ts: DataConfig,
                 ll: dict[str, np.ndarray] | None, cols: dict[str, np.ndarray] | None,
                 rules: dict[str, np.ndarray]) -> dict[str, Any]:
    """A policy's answers on one test set: mean reward with its CI, gain over pass@1 and the
    paired columns of the probes (vs greedy, vs reranking, vs each rule), on the test prompts
    its answers cover (all of them, unless some could not be scored)."""
    from qprobe.evaluate import Estimate

    n_boot, seed = ctx.cfg.eval.n_boot, ctx.cfg.seed
    pol = _rollouts(folder)
    got = dict(zip(pol.prompt_ids.tolist(), pol.rewards.tolist()))
    group, prompts = te.groups()
    rewards = te.rewards
    keep = ~np.isnan(rewards)
    present = sorted(set(group[keep].tolist()))  # test prompts in group order, as the probes'
    vals, p1 = [], []
    for g in present:
        r = got.get(prompts[g], float("nan"))
        if not np.isnan(r):
            vals.append(r)
            p1.append(float(np.mean(rewards[(group == g) & keep])))
    v = np.asarray(vals, dtype=np.float64)
    out: dict[str, Any] = {
        "spec": ctx.cfg.policies[name],
        "n_prompts": len(v), **dataclasses.asdict(Estimate.of(v, n_boot, seed)),
        "gain_over_pass@1": dataclasses.asdict(Estimate.of(v - np.asarray(p1), n_boot, seed))}
    # the paired columns need the policy's reward on every prompt the probes cover
    out["paired"] = paired_gains(ctx, te, v, base, ts, ll, cols, rules) \
        if len(v) == len(present) else {}
    return out


def headline_beta(ctx: Context, obj: str) -> float:
    """The policy temperature an objective's probes are reported at: the one cross-validation
    chose (`cv_grid.beta`), else `eval.beta`."""
    c = ctx.chosen.get(obj)
    return float(c.beta) if c is not None and c.beta is not None else ctx.cfg.eval.beta


def evaluate_probe(ctx: Context, group: np.ndarray, rewards: np.ndarray,
                   scores: list[np.ndarray], beta: float | None = None) -> dict[str, Any]:
    """One objective's probes (one score array [N] per seed): every k x beta per seed, and the
    headline (max k, `beta`, default eval.beta) averaged over seeds with CIs over prompts."""
    from qprobe.evaluate import Estimate, evaluate_groups, ranking

    ev, seed0 = ctx.cfg.eval, ctx.cfg.seed
    beta = ev.beta if beta is None else beta
    betas = sorted({*ev.betas, beta})
    runs, headline_vals, base_vals, ranks = {}, [], None, []
    for seed, sc in zip(ctx.cfg.probes.seeds, scores):
        ranks.append(ranking(group, rewards, sc))
        res = evaluate_groups(group, rewards, sc, ev.ks, betas, n_boot=ev.n_boot, seed=seed0,
                              keep_values=True)  # fmt: skip
        runs[str(seed)] = res.to_dict()
        headline_vals.append(res.values[(max(ev.ks), beta)])
        base_vals = res.base_values[max(ev.ks)]
    vals = np.mean(headline_vals, axis=0)  # [P] per-prompt reward, averaged over seeds
    seed_means = [float(v.mean()) for v in headline_vals]
    return {
        "k": max(ev.ks),
        "beta": beta,
        "mean_over_seeds": dataclasses.asdict(Estimate.of(vals, ev.n_boot, seed0)),
        "gain_over_pass@1": dataclasses.asdict(Estimate.of(vals - base_vals, ev.n_boot, seed0)),
        "seed_means": seed_means,
        "seed_std": float(np.std(seed_means)),
        "ranking": _mean_ranking(ranks),
        "runs": runs,
        "_values": vals,  # [P] per-prompt headline reward, prompts in group order
    }


def visible_score(cols: dict[str, np.ndarray]) -> np.ndarray:
    """The zero-parameter shown-tests baseline's score [N]: samples that pass the tests their
    prompt shows first, then by mean token log-probability (a constant where there is none)."""
    tie = cols.get("logprob_mean", np.zeros(len(cols["visible_pass"])))
    tie = (tie - np.min(tie)) / max(float(np.max(tie) - np.min(tie)), 1e-9)  # [0, 1]
    return 2.0 * cols["visible_pass"] + tie


def rerank_entry(ctx: Context, group: np.ndarray, rewards: np.ndarray, scores: np.ndarray
                 ) -> dict[str, Any]:
    """Choosing the sample the model itself finds likeliest (argmax of a log-likelihood score):
    the headline at the largest k, its gain over pass@1, and every k."""
    from qprobe.evaluate import evaluate_groups

    ev = ctx.cfg.eval
    res = evaluate_groups(group, rewards, scores, ev.ks, [0.0], n_boot=ev.n_boot, seed=ctx.cfg.seed)
    k = max(res.ks)
    return {**dataclasses.asdict(res.probe[(k, 0.0)]), "k": k,
            "gain": dataclasses.asdict(res.gain[(k, 0.0)]),
            "by_k": {str(kk): dataclasses.asdict(res.probe[(kk, 0.0)]) for kk in res.ks}}


def free_rules(te: Any, cols: dict[str, np.ndarray], ll: dict[str, np.ndarray] | None
               ) -> dict[str, np.ndarray]:
    """Scores [N] of each zero-parameter rule over the free signals `te` stores (mean-logprob
    reranking, a row of its own already, left out); none without log-likelihoods (the tie-break)."""
    from qprobe.verifier.baselines import rule_scores, visible_ordinal

    if ll is None:
        return {}
    rc = {**cols, "logprob_mean": ll["logprob_mean"]}
    if "visible_status" in te.table.column_names:
        rc["visible_ordinal"] = visible_ordinal(te.column("visible_status"))
    return {k: v for k, v in rule_scores(rc).items() if k != "rerank_mean_logprob"}


def vote_rules(cols: dict[str, np.ndarray], ll: dict[str, np.ndarray] | None
               ) -> dict[str, np.ndarray]:
    """{"majority_vote": scores [N]} where the folder has answer signatures (`mbr_size`):
    MBR-exec over answers (`qprobe.verifier.baselines` rule `mbr_exec`), i.e. the most frequent
    answer (self-consistency), ties broken by the mean log-prob of its best sample, or by sample
    order where the samples have no log-likelihoods (a server that gives none); {} otherwise."""
    from qprobe.verifier.baselines import rule_scores

    if "mbr_size" not in cols:
        return {}
    tie = ll["logprob_mean"] if ll is not None else np.zeros(len(cols["mbr_size"]))  # [N]
    return {"majority_vote": rule_scores({**cols, "logprob_mean": tie})["mbr_exec"]}


def weighted_vote_entry(ctx: Context, te: Any, rewards: np.ndarray, scores: list[np.ndarray],
                        majority: np.ndarray) -> dict[str, Any]:
    """The vote weighted by a probe's scores (`agreement.weighted_vote`), at the largest k,
    averaged over the seeds: its reward with a CI over prompts and its paired gain over the
    plain majority vote (`majority`: the majority-vote rule's scores) on the same prompts."""
    from qprobe.evaluate import Estimate, argmax_expected_reward, split_groups
    from qprobe.verifier.agreement import weighted_vote

    ev, k, seed = ctx.cfg.eval, max(ctx.cfg.eval.ks), ctx.cfg.seed
    group, _ = te.groups()
    sig = te.column("exec_sig")
    keep = ~np.isnan(rewards)

    def per_prompt(sc: np.ndarray) -> np.ndarray:
        parts = split_groups(group[keep], rewards[keep], sc[keep])
        return np.array([argmax_expected_reward(s, r, min(k, len(r))) for r, s in parts])

    vals = np.mean([per_prompt(weighted_vote(group, sig, sc)) for sc in scores], axis=0)
    return {**dataclasses.asdict(Estimate.of(vals, ev.n_boot, seed)), "k": k,
            "vs_majority_vote": dataclasses.asdict(
                Estimate.of(vals - per_prompt(majority), ev.n_boot, seed))}


def paired_gains(ctx: Context, te: Any, vals: np.ndarray, base: Baselines, ts: DataConfig,
                 ll: dict[str, np.ndarray] | None, cols: dict[str, np.ndarray] | None = None,
                 rules: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The probe's headline per-prompt reward minus greedy's, minus mean-logprob reranking's,
    (given the visible_pass column) minus the shown-tests filter's and minus each free rule's
    (`rules`: name -> scores [N]) on the same prompts, with paired bootstrap CIs."""
    from qprobe.evaluate import Estimate, argmax_expected_reward, split_groups

    ev, k = ctx.cfg.eval, max(ctx.cfg.eval.ks)
    group, prompts = te.groups()
    rewards = te.rewards
    keep = ~np.isnan(rewards)
    present = sorted(set(group[keep].tolist()))  # the prompts `vals` covers, in group order
    if len(present) != len(vals):
        return {}
    out: dict[str, Any] = {}
    if ts.label in base.greedy:
        g = _rollouts(base.greedy[ts.label])
        g_of = dict(zip(g.prompt_ids.tolist(), g.rewards.tolist()))
        diffs = [v - g_of[prompts[i]] for i, v in zip(present, vals)
                 if prompts[i] in g_of and not np.isnan(g_of[prompts[i]])]
        out["vs_greedy"] = dataclasses.asdict(Estimate.of(np.asarray(diffs), ev.n_boot, ctx.cfg.seed))
    if ll is not None:
        parts = split_groups(group[keep], rewards[keep], ll["logprob_mean"][keep])
        rr = np.array([argmax_expected_reward(sc, r, min(k, len(r))) for r, sc in parts])
        out["vs_rerank_mean_logprob"] = dataclasses.asdict(
            Estimate.of(vals - rr, ev.n_boot, ctx.cfg.seed))
    if cols is not None and "visible_pass" in cols:
        parts = split_groups(group[keep], rewards[keep], visible_score(cols)[keep])
        rv = np.array([argmax_expected_reward(sc, r, min(k, len(r))) for r, sc in parts])
        out["vs_rerank_visible"] = dataclasses.asdict(Estimate.of(vals - rv, ev.n_boot, ctx.cfg.seed))
    for name, sc in (rules or {}).items():
        parts = split_groups(group[keep], rewards[keep], sc[keep])
        rr = np.array([argmax_expected_reward(s, r, min(k, len(r))) for r, s in parts])
        out[f"vs_{name}"] = dataclasses.asdict(Estimate.of(vals - rr, ev.n_boot, ctx.cfg.seed))
    return out


def with_greedy_entry(ctx: Context, te: Any, greedy: Any, probes: list[Any],
                      scores: list[np.ndarray], beta_h: float | None = None) -> dict[str, Any]:
    """The probe choosing among the greedy completion plus k-1 random samples (k = max), at
    beta = 0 and the headline beta, averaged over seeds, with CIs over prompts."""
    from qprobe.evaluate import Estimate, with_extra_candidate_reward

    ev, k = ctx.cfg.eval, max(ctx.cfg.eval.ks)
    gi = {p: i for i, p in enumerate(greedy.prompt_ids.tolist())}
    g_rew = greedy.rewards
    group, prompts = te.groups()
    rewards = te.rewards
    out: dict[str, Any] = {"k": k}
    for beta in sorted({0.0, ev.beta if beta_h is None else beta_h}):
        per_seed = []
        for probe, sc in zip(probes, scores):
            g_sc = probe.score_rollouts(greedy).astype(np.float64)
            rng = np.random.default_rng([ctx.cfg.seed, k])
            vals = []
            for g, pid in enumerate(prompts):
                m = (group == g) & ~np.isnan(rewards)
                j = gi.get(pid)
                if j is None or np.isnan(g_rew[j]) or not m.any():
                    continue
                vals.append(with_extra_candidate_reward(sc[m], rewards[m], g_sc[j], g_rew[j], k,
                                                        beta, rng))
            per_seed.append(np.asarray(vals))
        v = np.mean(per_seed, axis=0)
        g = np.array([g_rew[gi[pid]] for g_, pid in enumerate(prompts)
                      if gi.get(pid) is not None and not np.isnan(g_rew[gi[pid]])
                      and ((group == g_) & ~np.isnan(rewards)).any()])
        out[f"beta={beta:g}"] = {
            **dataclasses.asdict(Estimate.of(v, ev.n_boot, ctx.cfg.seed)),
            "vs_greedy": dataclasses.asdict(Estimate.of(v - g, ev.n_boot, ctx.cfg.seed))}
    return out


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
