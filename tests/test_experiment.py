"""`run`: a whole experiment end to end on a tiny random model and a toy task; config parsing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qprobe import tasks
from qprobe.cli import main
from qprobe.errors import QProbeError
from qprobe.experiment import config_from_dict, load_config, run_experiment
from qprobe.probe import Probe
from qprobe.rollouts import Rollouts
from qprobe.tasks.base import Score, Task
from tiny_lm import save_tiny


class VowelTask(Task):
    """Toy task with a real verifier: reward 1 when the completion contains a lowercase vowel."""

    name = "test-vowels"
    stop: list[str] = []

    def splits(self) -> dict[str, int]:
        return {"train": 12, "test": 6}

    def _load(self, split: str) -> list[dict]:
        n, off = (12, 0) if split == "train" else (6, 100)
        return [{"id": f"{split}{i}", "prompt": f"word {i + off}:", "n": i} for i in range(n)]

    def score(self, prompts, completions, **columns):
        assert len(columns["n"]) == len(prompts)  # task columns reach the reward
        return [Score(float(any(v in c for v in "aeiou")), "ok") for c in completions]


tasks.register("test-vowels", VowelTask, "toy task for tests")


def _config(tmp_path, model_dir, **over):
    d = {
        "name": "tiny",
        "out": str(tmp_path / "run"),
        "seed": 0,
        "model": {"name": str(model_dir), "layer": 1},
        "sampling": {"k": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6},
        "train": {"task": "test-vowels", "split": "train"},
        "test": [{"task": "test-vowels", "split": "test", "name": "vowels"}],
        "probes": {
            "objectives": ["q", "ce", "pg"],
            "seeds": [0, 1],
            "train": {"epochs": 5, "min_steps": 20, "batch_size": 16},
        },
        "eval": {"ks": [1, 2, 4], "betas": [0.0, 0.1], "beta": 0.1, "n_boot": 100},
        "baselines": {"greedy": True, "few_shot": 2},
        "curve": {"sizes": [4, 8], "subsets": 2, "objective": "pg", "samples": [2, 4, 5]},
    }
    d.update(over)
    return config_from_dict(d)


def test_run_end_to_end_and_resume(tmp_path) -> None:
    model_dir = save_tiny(tmp_path / "model")
    cfg = _config(tmp_path, model_dir)
    lines: list[str] = []
    res = run_experiment(cfg, log=lines.append, progress=False)
    rep = tmp_path / "run" / "report"
    for f in (
        "results.md",
        "results.json",
        "reward_vs_k.png",
        "reward_vs_train_prompts.png",
        "score_vs_reward.png",
    ):
        assert (rep / f).is_file() and (rep / f).stat().st_size > 0, f
    saved = json.loads((rep / "results.json").read_text())
    t = saved["test"]["vowels"]
    assert t["n_prompts"] == 6 and t["n_samples"] == 24
    assert t["pass@k"]["4"]["mean"] >= t["pass@1"]["mean"]
    assert set(t["probes"]) == {"q", "ce", "pg"}
    for pr in t["probes"].values():
        assert len(pr["seed_means"]) == 2
        # choosing among 4 samples never beats the best of them (the skyline)
        assert 0.0 <= pr["mean_over_seeds"]["mean"] <= t["pass@k"]["4"]["mean"] + 1e-9
        rk = pr["ranking"]
        assert rk["within_prompt"] is None or 0.0 <= rk["within_prompt"] <= 1.0
    # the baselines decode greedily once per test prompt; few-shot prompts carry the shots
    greedy = Rollouts(tmp_path / "run" / "rollouts" / "greedy-vowels")
    assert len(greedy) == 6 and greedy.meta["sampling"]["temperature"] == 0.0
    assert saved["test"]["vowels"]["greedy"]["mean"] == pytest.approx(
        float(np.mean(greedy.rewards))
    )
    few = Rollouts(tmp_path / "run" / "rollouts" / "fewshot-vowels")
    assert few.meta["prefix"].count("word") == 2 and len(few) == 6
    assert sorted(saved["curve"]["sizes"]) == ["4", "8"]
    assert all(len(v) == 2 for v in saved["curve"]["sizes"].values())
    assert sorted(saved["curve"]["samples"]) == ["2", "4"]  # 5 > the 4 stored per prompt
    assert any("5 samples per prompt" in s and "skipped" in s for s in lines)
    assert (tmp_path / "run" / "probes" / "pg-seed1" / "config.json").is_file()
    md = (rep / "results.md").read_text()
    assert "pass@4 (skyline)" in md and "probe `pg`" in md and "greedy" in md
    assert "| probe | within prompt | pooled AUC |" in md
    assert "| samples per prompt | rows |" in md
    # a second run resumes: nothing is sampled again and the numbers are the same
    lines2: list[str] = []
    res2 = run_experiment(cfg, log=lines2.append, progress=False)
    assert sum("already collected" in s for s in lines2) == 4  # train, test, greedy, few-shot
    assert any("probes: train data and settings unchanged, 6 probes loaded" in s for s in lines2)
    assert not any("trained probe" in s for s in lines2)
    assert any("stored curve used" in s for s in lines2) and res2["curve"] == res["curve"]
    assert (
        res2["test"]["vowels"]["probes"]["pg"]["mean_over_seeds"]
        == res["test"]["vowels"]["probes"]["pg"]["mean_over_seeds"]
    )
    # a lower limit than the folder holds is refused: training would read every stored prompt
    with pytest.raises(QProbeError, match="more than the limit 3"):
        run_experiment(cfg, log=lambda s: None, limit=3, progress=False)


def test_probes_are_trained_again_only_when_their_inputs_change(tmp_path) -> None:
    """A resumed run loads the stored probes when the train data and the probe settings are
    the same (probes/inputs.json), and trains them again after a change of either; a train set
    that grew keeps the few-shot baseline's shots."""
    model_dir = save_tiny(tmp_path / "model")
    probes = {"objectives": ["pg"], "seeds": [0], "cv": 2,
              "cv_grid": {"min_steps": [20], "weight_decay": [0.0], "beta": [0.0, 0.5]},
              "train": {"epochs": 5, "min_steps": 20, "batch_size": 16}}
    small = {"train": {"task": "test-vowels", "split": "train", "limit": 8}, "probes": probes,
             "baselines": {"greedy": False, "few_shot": 2},
             "curve": {"sizes": [4], "subsets": 1, "objective": "pg", "samples": []},
             "eval": {"ks": [1, 4], "betas": [0.0], "beta": 0.1, "n_boot": 50}}
    weights = tmp_path / "run" / "probes" / "pg-seed0" / "probe.safetensors"

    def run(**over):
        lines: list[str] = []
        res = run_experiment(_config(tmp_path, model_dir, **{**small, **over}), log=lines.append,
                             progress=False)
        trained = sum("trained probe" in s for s in lines)
        # the test set and the curve settings stay: the curve is kept exactly when the probes are
        assert any("stored curve used" in s for s in lines) == (trained == 0)
        return res["test"]["vowels"]["probes"]["pg"], res, trained

    pg1, _, trained = run()
    assert trained == 1
    stamp = weights.stat().st_mtime_ns
    pg2, res2, trained = run()  # nothing changed: loaded, same numbers, same CV choice
    assert trained == 0 and weights.stat().st_mtime_ns == stamp
    curve = json.loads((tmp_path / "run" / "probes" / "curve.json").read_text())
    assert res2["curve"] == curve["curve"] and len(curve["curve"]["sizes"]["4"]) == 1
    assert (pg2["mean_over_seeds"], pg2["cv_chosen"], pg2["beta"]) == (
        pg1["mean_over_seeds"], pg1["cv_chosen"], pg1["beta"])
    wider = {**probes, "cv_grid": {**probes["cv_grid"], "weight_decay": [0.0, 1.0]}}
    _, _, trained = run(probes=wider)  # a changed CV grid
    assert trained == 1 and weights.stat().st_mtime_ns != stamp
    assert any("wd=1 " in row["label"] for row in Probe.load(weights.parent).info["cv"]["rows"])
    _, _, trained = run(probes=wider)
    assert trained == 0
    stamp = weights.stat().st_mtime_ns
    few = tmp_path / "run" / "rollouts" / "fewshot-vowels"
    prefix = Rollouts(few).meta["prefix"]
    _, res, trained = run(probes=wider, train={"task": "test-vowels", "split": "train", "limit": 12})
    assert trained == 1 and weights.stat().st_mtime_ns != stamp  # more train rows
    # the few-shot folder keeps its shots (a new seeded choice among more rows would differ)
    assert Rollouts(few).meta["prefix"] == prefix and len(Rollouts(few)) == 6
    assert res["train"]["n_prompts"] == 12
    stored = json.loads((tmp_path / "run" / "probes" / "inputs.json").read_text())
    assert stored["train"]["rows"] == 48 and stored["probes"]["cv_grid"]["weight_decay"] == [0.0, 1.0]


def test_pick_shots_keeps_the_shots_a_stored_prefix_is_made_of(tmp_path) -> None:
    from qprobe.experiment.baselines import few_shot_prefix, pick_shots
    from qprobe.rollouts import write_rollouts

    comps = {0: ["a", "a\n\nb"], 1: ["c", "x"], 2: ["d", "y"], 3: ["e", "z"]}
    write_rollouts(tmp_path / "tr", [
        {"prompt_id": f"p{i}", "sample_idx": j, "prompt": f"word {i}:", "completion": c,
         "reward": 1.0} for i, cs in comps.items() for j, c in enumerate(cs)], None, meta={})
    fresh = pick_shots(tmp_path / "tr", 2, 0)
    stored = few_shot_prefix([("word 0:", "a\n\nb"), ("word 2:", "d")])
    assert few_shot_prefix(fresh) != stored  # (else the test shows nothing)
    assert pick_shots(tmp_path / "tr", 2, 0, stored) == [("word 0:", "a\n\nb"), ("word 2:", "d")]
    assert pick_shots(tmp_path / "tr", 3, 0, stored) == pick_shots(tmp_path / "tr", 3, 0)  # n changed
    other = few_shot_prefix([("word 9:", "a"), ("word 2:", "d")])  # not train samples
    assert pick_shots(tmp_path / "tr", 2, 0, other) == fresh


def test_config_errors(tmp_path) -> None:
    with pytest.raises(QProbeError, match="unknown key"):
        config_from_dict({"train": {"task": "x"}, "test": [{"task": "x"}], "sampling": {"kk": 1}})
    with pytest.raises(QProbeError, match="test set"):
        config_from_dict({"train": {"task": "x"}})
    with pytest.raises(QProbeError, match="eval.ks"):
        config_from_dict(
            {
                "train": {"task": "x"},
                "test": [{"task": "x"}],
                "sampling": {"k": 4},
                "eval": {"ks": [8]},
            }
        )
    with pytest.raises(QProbeError, match="probes.train"):
        config_from_dict(
            {
                "train": {"task": "x"},
                "test": [{"task": "x"}],
                "probes": {"train": {"learning_rate": 1}},
            }
        )
    with pytest.raises(QProbeError, match="executor.kind must be local or ray"):
        config_from_dict({"train": {"task": "x"}, "test": [{"task": "x"}],
                          "executor": {"kind": "slurm"}})
    ex = config_from_dict({"train": {"task": "x"}, "test": [{"task": "x"}],
                           "executor": {"kind": "ray", "workers": 4, "gpus_per_worker": 1}}).executor
    assert (ex.kind, ex.workers, ex.gpus_per_worker, ex.storage) == ("ray", 4, 1, "auto")
    # the knobs an experiment hands to each collection are the same dataclass as collect's flags
    from qprobe.collect import RayConfig

    assert ex.ray_knobs() == RayConfig(workers=4, gpus_per_worker=1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    assert main(["run", str(bad)]) == 2
    with pytest.raises(QProbeError, match="invalid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("train: {task: mbpp}\ntest: [{task: mbpp, split: test}]\n")
    cfg = load_config(good, ["sampling.k=4", "eval.ks=[1, 2]", "probes.seeds=[5]"])
    assert cfg.name == "good" and cfg.sampling.k == 4 and cfg.probes.seeds == [5]
    assert cfg.eval.ks == [1, 2, 4]  # the headline k = sampling.k is always evaluated
    with pytest.raises(QProbeError, match="KEY=VALUE"):
        load_config(good, ["sampling.k"])


def test_shipped_experiment_files_parse(capsys) -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "experiments"
    files = sorted(root.glob("*.yaml"))
    assert files, "experiments/*.yaml missing"
    for f in files:
        cfg = load_config(f)
        assert cfg.test and cfg.train.task in tasks.list_tasks()
        assert main(["run", str(f), "--check"]) == 0
        assert json.loads(capsys.readouterr().out)["name"] == cfg.name


def test_run_with_embed_cv_rerank_and_greedy_candidate(tmp_path) -> None:
    """The issue-16 stages on a tiny model: every folder re-encoded, each probe's inputs chosen by
    CV on train, reranking baselines, paired gains and the greedy completion among candidates."""
    model_dir = save_tiny(tmp_path / "model")
    cfg = _config(tmp_path, model_dir,
                  probes={"objectives": ["pg"], "seeds": [0], "cv": 2,
                          "cv_grid": {"min_steps": [20], "weight_decay": [0.0], "beta": [0.0, 0.5]},
                          "train": {"epochs": 5, "min_steps": 20, "batch_size": 16}},
                  eval={"ks": [1, 2, 4], "betas": [0.0, 0.1], "beta": 0.1, "n_boot": 100,
                        "with_greedy": True},
                  embed={"enabled": True, "layers": [0, 1]},
                  curve={"sizes": [4], "subsets": 1, "objective": "pg"})
    res = run_experiment(cfg, progress=False, log=lambda s: None)
    for name in ("train", "vowels", "greedy-vowels"):
        r = Rollouts(tmp_path / "run" / "rollouts" / name)
        assert {"L0-last", "L0-mean", "L1-last", "L1-mean"} <= set(r.feature_sets)
    t = res["test"]["vowels"]
    assert {"rerank_mean_logprob", "rerank_sum_logprob"} <= set(t)
    assert 0.0 <= t["rerank_mean_logprob"]["mean"] <= t["pass@k"]["4"]["mean"] + 1e-9
    pg = t["probes"]["pg"]
    assert pg["cv_chosen"] and {"vs_greedy", "vs_rerank_mean_logprob"} <= set(pg["paired"])
    # the headline is at the beta CV chose (0.5 is not among eval.betas: it is added)
    assert pg["beta"] in (0.0, 0.5) and pg["cv_chosen"].endswith(f"beta={pg['beta']:g}")
    assert {"beta=0", f"beta={pg['beta']:g}"} == set(pg["with_greedy"]) - {"k"}
    assert any(row["beta"] == pg["beta"] for row in pg["runs"]["0"]["probe"])
    assert res["curve"]["beta"] == pg["beta"]
    md = (tmp_path / "run" / "report" / "results.md").read_text()
    assert "rerank by mean token log-prob" in md and "greedy + 3 samples" in md
    assert "chosen on train" in md and f"probe `pg` (k=4, beta={pg['beta']:g})" in md
    assert res["curve"]["inputs"] == pg["cv_chosen"]  # the curve trains what CV chose
    assert len(res["curve"]["sizes"]["4"]) == 1


def test_run_with_the_prompts_shown_tests(tmp_path) -> None:
    """baselines.visible on code tasks: every folder gets a visible_reward column, the report has
    the shown-tests filter and the paired comparison against it, and CV may use the input."""
    model_dir = save_tiny(tmp_path / "model")
    cfg = _config(tmp_path, model_dir,
                  train={"task": "mbpp", "split": "train", "limit": 6},
                  test=[{"task": "humaneval", "split": "test", "name": "he", "limit": 4}],
                  probes={"objectives": ["pg"], "seeds": [0], "cv": 2,
                          "cv_grid": {"min_steps": [20], "weight_decay": [0.0], "loglik": ["without"]},
                          "train": {"epochs": 5, "min_steps": 20, "batch_size": 16}},
                  baselines={"greedy": True, "few_shot": 0, "visible": True},
                  curve={"sizes": [], "samples": []})
    res = run_experiment(cfg, progress=False, log=lambda s: None)
    for name in ("train", "he", "greedy-he"):
        r = Rollouts(tmp_path / "run" / "rollouts" / name)
        assert "visible_reward" in r.table.column_names
        assert set(r.column("visible_reward")) <= {0.0, 1.0, None}
    t = res["test"]["he"]
    assert "rerank_visible" in t and "vs_rerank_visible" in t["probes"]["pg"]["paired"]
    cv = Probe.load(tmp_path / "run" / "probes" / "pg-seed0").info["cv"]
    assert any("+visible" in row["label"] for row in cv["rows"])
    md = (tmp_path / "run" / "report" / "results.md").read_text()
    assert "filter by the prompt's shown tests" in md and "vs shown-tests filter" in md


def test_report_headline_is_the_objective_cv_ranks_first_not_the_best_on_test(tmp_path) -> None:
    """The committed MBPP report: `ce` is best on test, `pg` best in CV on train. The headline
    follows CV wherever the CV scores put it, and regenerating from the stored results.json and
    the probes' CV records gives the same files."""
    import shutil
    from pathlib import Path

    from qprobe.experiment.report import headline_objective, regenerate, results_markdown

    exp = Path(__file__).resolve().parents[1] / "results" / "mbpp-qwen-coder"
    res = json.loads((exp / "report" / "results.json").read_text())
    t = res["test"]["mbpp-test"]["probes"]
    assert max(t, key=lambda o: t[o]["mean_over_seeds"]["mean"]) == "ce"
    assert headline_objective(res)["objective"] == "pg" == res["headline"]["objective"]
    for probes in (p["probes"] for p in res["test"].values()):
        probes["q"]["cv_score"] = {"mean": 0.9, "se": 0.01}  # now q is first in CV
    res["headline"] = headline_objective(res)
    md = results_markdown(res)
    assert res["headline"]["objective"] == "q" and "`q` 0.9000 +- 0.0100" in md
    rows = [line for line in md.splitlines() if "**headline**" in line]
    assert len(rows) == 2 and all(line.startswith("| probe `q` (k=16, beta=0)") for line in rows)
    del res["headline"]
    for probes in (p["probes"] for p in res["test"].values()):
        del probes["q"]["cv_score"]
    assert headline_objective(res) is None  # a CV score missing: no headline
    assert "none is the headline" in results_markdown(res)
    # regenerate() from results.json without cv_score + the probes' CV records: the same report
    copy = tmp_path / "exp"
    shutil.copytree(exp / "report", copy / "report")
    shutil.copytree(exp / "probes", copy / "probes", ignore=shutil.ignore_patterns("*.safetensors"))
    stored = json.loads((copy / "report" / "results.json").read_text())
    for probes in (p["probes"] for p in stored["test"].values()):
        for p in probes.values():
            del p["cv_score"]
    del stored["headline"]
    (copy / "report" / "results.json").write_text(json.dumps(stored, indent=2) + "\n")
    regenerate(copy)
    for f in ("results.json", "results.md"):
        assert (copy / "report" / f).read_text() == (exp / "report" / f).read_text()


def test_free_rules_rows_and_paired_table_on_a_hand_made_folder(tmp_path):
    """The free rules of a test folder (shown-test filter, error class, MBR-exec) come out as
    score arrays whose argmax is the rule's choice, and the report lists each with its paired
    column; a folder without log-likelihoods (the tie-break) has none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qprobe.experiment.report import _rules_table
    from qprobe.experiment.run import free_rules
    from qprobe.rollouts import Rollouts
    from test_cv import make_folder

    r = make_folder(tmp_path / "t", 0, prompts=2, k=4)
    status = ["wrong_answer", "pass", "exception", "pass", "syntax_error", "wrong_answer",
              "wrong_answer", "pass"]
    sig = ["a", "b", "c", "b", "x", "y", "y", "z"]
    shard = tmp_path / "t" / "samples-00000.parquet"
    t = pq.read_table(shard)
    for name, col in (("visible_reward", [float(s == "pass") for s in status]),
                      ("visible_status", status), ("exec_sig", sig)):
        t = t.append_column(name, pa.array(col))
    pq.write_table(t, shard)
    r = Rollouts(tmp_path / "t")
    rules = free_rules(r, r.extra_inputs(), r.loglik())
    assert {"shown_test_filter", "shown_test_error_class", "mbr_exec",
            "filter_then_mbr_exec"} <= set(rules)
    ll = r.loglik()["logprob_mean"]
    first = lambda sc, g: int(np.argmax(sc[4 * g:4 * g + 4]))  # noqa: E731
    # prompt 0: samples 1 and 3 pass; the likelier one wins
    assert first(rules["shown_test_filter"], 0) == (1 if ll[1] > ll[3] else 3)
    # prompt 1: only sample 7 passes; MBR-exec alone picks the biggest cluster ("y": 5 or 6)
    assert first(rules["shown_test_filter"], 1) == 3
    assert first(rules["mbr_exec"], 1) in (1, 2)
    # prompt 1, error class: a wrong answer (5, 6) beats a syntax error (4) after the pass (7)
    order = np.argsort(-rules["shown_test_error_class"][4:8])
    assert order[0] == 3 and 0 == order[-1]
    assert free_rules(r, r.extra_inputs(), None) == {}
    est = {"mean": 0.1, "lo": -0.1, "hi": 0.2}
    table = _rules_table({"rules": {"shown_test_filter": {"mean": 0.5, "ranking": {
        "within_prompt": 0.9, "pooled_auc": 0.8}}, "mbr_exec": {"mean": 0.3}},
        "probes": {"pg": {"paired": {"vs_shown_test_filter": est, "vs_mbr_exec": est}}}})
    assert "is `shown_test_filter`" in table[0]
    assert "| `pg` | +0.100 [-0.100, +0.200] | +0.100 [-0.100, +0.200] |" in table
    assert "| `shown_test_filter` | 0.900 | 0.800 |" in table


def test_run_evaluates_the_yaml_policies_beside_the_probes(tmp_path) -> None:
    """`policies:` (greedy, logprob, guided with an ARM head, a Q-Adapter) answer every test
    prompt once and get the probes' rows: CI, gain over pass@1, paired columns. The greedy
    policy must match the greedy baseline prompt for prompt (paired difference exactly 0)."""
    pytest.importorskip("peft")
    import torch

    from qprobe.backends import load_model
    from qprobe.policy.heads import RewardHead, tokenizer_identity

    model_dir = save_tiny(tmp_path / "model")
    lm = load_model(str(model_dir), layer=1)
    torch.manual_seed(0)
    head = RewardHead("arm", lm.feature_spec.dim, rank=4, feature_spec=lm.feature_spec,
                      tokenizer=tokenizer_identity(lm.tok.tokenizer))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    head.save(tmp_path / "head")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"word {i}:", "chosen": " a",
                                         "rejected": " x"}) + "\n" for i in range(4)))
    assert main(["adapt", "--model", str(model_dir), "--task", str(pairs), "--split", "all",
                 "--out", str(tmp_path / "qa"), "--batch-pairs", "4", "--lora-r", "4",
                 "--no-chat", "--max-answer-tokens", "4"]) == 0
    policies = {"g": "greedy", "lp": "logprob:reduce=sum,k=4",
                "guided": f"guided:head={tmp_path / 'head'},beta=4,top_k=5",
                "qa": f"qadapter:adapter={tmp_path / 'qa'}"}
    cfg = _config(tmp_path, model_dir, probes={"objectives": ["q"], "seeds": [0],
                                               "train": {"epochs": 2, "min_steps": 5}},
                  curve={"sizes": [], "samples": []}, policies=policies)
    res = run_experiment(cfg, progress=False, log=lambda s: None)
    t = res["test"]["vowels"]
    assert set(t["policies"]) == set(policies)
    for name, pol in t["policies"].items():
        assert pol["n_prompts"] == 6 and pol["spec"] == policies[name]
        assert pol["lo"] <= pol["mean"] <= pol["hi"]
        assert {"vs_greedy", "vs_rerank_mean_logprob"} <= set(pol["paired"])
        folder = Rollouts(tmp_path / "run" / "rollouts" / f"policy-{name}-vowels")
        assert len(folder) == 6 and folder.meta["model"].startswith(f"policy:{name}:")
        assert pol["mean"] == pytest.approx(float(np.mean(folder.rewards)))
    assert t["policies"]["g"]["mean"] == pytest.approx(t["greedy"]["mean"])
    assert t["policies"]["g"]["paired"]["vs_greedy"]["mean"] == 0.0
    md = (tmp_path / "run" / "report" / "results.md").read_text()
    for name in policies:
        assert f"| policy `{name}` (`{policies[name]}`, 6 prompts) |" in md
        assert f"| policy `{name}` | " in md  # the paired table
    # a bad spec is refused when the YAML is read, before anything runs
    with pytest.raises(QProbeError, match="unknown kind 'nope'"):
        _config(tmp_path, model_dir, policies={"x": "nope"})


def test_run_with_votes_on_gsm8k_pal(tmp_path) -> None:
    """baselines.vote: every train and test sample gets its answer as exec_sig (run in the
    sandbox), the report has the majority vote and each probe's weighted vote, paired against the
    vote, and CV may give the probes the vote share."""
    model_dir = save_tiny(tmp_path / "model")
    cfg = _config(tmp_path, model_dir,
                  train={"task": "gsm8k-pal", "split": "train", "limit": 6},
                  test=[{"task": "gsm8k-pal", "split": "test", "name": "pal", "limit": 4}],
                  probes={"objectives": ["pg"], "seeds": [0], "cv": 2,
                          "cv_grid": {"min_steps": [20], "weight_decay": [0.0], "loglik": ["with"],
                                      "signals": ["none", "mbr_share"]},
                          "train": {"epochs": 5, "min_steps": 20, "batch_size": 16}},
                  baselines={"greedy": True, "few_shot": 0, "vote": True},
                  curve={"sizes": [], "samples": []})
    res = run_experiment(cfg, progress=False, log=lambda s: None)
    for name in ("train", "pal"):
        r = Rollouts(tmp_path / "run" / "rollouts" / name)
        sig = r.column("exec_sig")
        assert None not in sig and all(s.startswith(("!", '["=')) for s in sig)
        assert "mbr_share" in r.extra_inputs()
    t = res["test"]["pal"]
    assert "majority_vote" in t["rules"]
    pg = t["probes"]["pg"]
    assert {"vs_majority_vote"} <= set(pg["paired"]) and "vs_majority_vote" in pg["weighted_vote"]
    assert 0.0 <= pg["weighted_vote"]["mean"] <= t["pass@k"]["4"]["mean"] + 1e-9
    cv = Probe.load(tmp_path / "run" / "probes" / "pg-seed0").info["cv"]
    assert any("mbr_share" in row["label"] for row in cv["rows"])
    md = (tmp_path / "run" / "report" / "results.md").read_text()
    assert "free rule `majority_vote`" in md and "vote weighted by probe `pg`" in md
    assert "| vote weighted by `pg` |" in md
