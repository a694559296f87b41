"""Tasks: splits, prompt formats, ids, rewards; MBPP reference solutions; GSM8K gold answers."""

from __future__ import annotations

import gzip
import json
import textwrap
from pathlib import Path

import pytest

from qprobe.errors import QProbeError
from qprobe.sandbox import SandboxConfig
from qprobe.tasks import Task, get_task, list_tasks, register
from qprobe.tasks.gsm8k import extract, gold, normalize
from qprobe.tasks.preference import split_pair

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FAST = SandboxConfig(timeout=10.0)  # generous: correctness here, not speed, on a busy machine

# MBPP reference solutions that fail their own tests on CPython 3 (the data set's known bugs):
#  341: asserts the iteration order of a set ({12..16} iterates 16 first);
#  596: asserts sys.getsizeof of a tuple (104), which depends on the CPython version;
#  642: asserts a set of tuples built from set() iteration order of inner tuples.
MBPP_KNOWN_BAD = {"341", "596", "642"}


def test_registry():
    assert {"humaneval", "mbpp", "gsm8k", "gsm8k-strict", "hh-harmless"} <= set(list_tasks())
    with pytest.raises(QProbeError, match="unknown task 'nope'"):
        get_task("nope")

    class Tiny(Task):
        name = "tiny"

        def splits(self):
            return {"all": 1}

        def _load(self, split):
            return [{"id": "a", "prompt": "1+1="}]

    register("tiny-test", Tiny)
    assert get_task("tiny-test", data="ignored").prompts("all") == [{"id": "a", "prompt": "1+1="}]


def test_missing_data_says_where_and_how():
    with pytest.raises(QProbeError) as e:
        get_task("mbpp", data="/nonexistent/data")
    msg = str(e.value)
    assert "/nonexistent/data/mbpp/mbpp.jsonl" in msg and "qprobe tasks download mbpp" in msg
    assert "\n" not in msg


def test_data_from_env(monkeypatch):
    monkeypatch.setenv("QPROBE_DATA", str(DATA))
    monkeypatch.chdir("/")
    assert get_task("mbpp").splits()["test"] == 500


def test_humaneval_prompts_and_program():
    t = get_task("humaneval")
    assert t.splits() == {"test": 164}
    rows = t.prompts("test")
    assert rows[0]["id"] == "HumanEval/0" and rows[0]["prompt"].startswith("from typing import")
    assert len(t.prompts("test", limit=3)) == 3
    r = rows[5]
    assert t.program(r, "X") == r["prompt"] + "X\n" + r["test"] + "\n" + f"check({r['entry_point']})"
    assert "\ndef " in t.stop
    with pytest.raises(QProbeError, match="no split 'train'"):
        t.prompts("train")


def test_mbpp_splits_and_prompt():
    t = get_task("mbpp", data=str(DATA))
    assert t.splits() == {"train": 464, "test": 500, "validation": 90, "prompt": 10}
    test = t.prompts("test")
    assert [r["id"] for r in test] == [str(i) for i in range(11, 511)]
    train_ids = {int(r["id"]) for r in t.prompts("train")}
    assert train_ids == set(range(511, 975))
    r = test[0]
    assert r["prompt"] == f'"""\n{r["text"]}\n{r["test_list"][0]}\n"""\n'
    shots = get_task("mbpp", data=str(DATA), few_shot=3).prompts("test", limit=1)[0]["prompt"]
    assert shots.endswith(r["prompt"]) and shots.count('"""\n') == 8


def test_mbpp_reference_solutions_pass():
    t = get_task("mbpp", data=str(DATA), sandbox=FAST)
    try:
        ids = [str(i) for i in range(1, 975)]
        refs = [t._rows()[int(i)]["code"] for i in ids]
        scores = t.score([""] * len(ids), refs, prompt_id=ids)
        # A few references are slow (123 sums divisors up to 10,000: ~6 s alone); on a busy
        # machine they can pass the 10 s limit. Correctness is the point here, not speed:
        # score the timeouts again, one at a time, with a limit no healthy run reaches.
        slow = [n for n, s in enumerate(scores) if s.status == "timeout"]
        if slow:
            patient = get_task("mbpp", data=str(DATA), sandbox=SandboxConfig(timeout=300.0))
            try:
                for n in slow:
                    scores[n] = patient.score([""], [refs[n]], prompt_id=[ids[n]])[0]
            finally:
                patient.close()
        failed = {i for i, s in zip(ids, scores) if s.status != "passed"}
        assert failed == MBPP_KNOWN_BAD, {i: s for i, s in zip(ids, scores) if i in failed}
        # Broken completions fail, and the reward is 0/1.
        bad = t.score(["", ""], ["def f(:\n", "pass\n"], prompt_id=["11", "12"])
        assert [s.reward for s in bad] == [0.0, 0.0] and bad[0].status == "error"
        assert t.reward([""], [refs[10]], prompt_id=["11"]) == [1.0]
    finally:
        t.close()


def test_gsm8k_gold_answers_extract_on_all_test_rows():
    rows = [json.loads(x) for x in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 1319
    for r in rows:
        want = r["answer"].split("####")[-1].strip().replace(",", "")
        assert extract(r["answer"], "strict") == normalize(want) is not None
        assert extract(r["answer"], "flexible") == normalize(want)
    for name in ("gsm8k", "gsm8k-strict"):
        t = get_task(name, data=str(DATA))
        prompts = t.prompts("test")
        golds = [r["answer"] for r in rows]
        assert t.reward([p["prompt"] for p in prompts], golds,
                        prompt_id=[p["id"] for p in prompts]) == [1.0] * 1319  # fmt: skip


def test_gsm8k_extraction_and_reward():
    assert normalize("$1,234.50.") == "1234.5" and normalize("12.0") == "12"
    assert normalize("-3") == "-3" and normalize("abc") is None
    assert extract("so she pays $18.", "flexible") == "18"
    assert extract("so she pays $18.", "strict") is None
    assert extract("first 3, then #### 1,000", "strict") == "1000"
    assert extract("no number here") is None
    assert gold("blah\n#### 72") == "72"
    t = get_task("gsm8k", data=str(DATA))
    p = t.prompts("test", limit=1)[0]
    assert p["id"] == "test/0" and p["prompt"].startswith("Question: ") and p["answer"] == "18"
    assert p["prompt"].endswith("\nAnswer:")
    s = t.score([p["prompt"]] * 3, ["She makes $18.", "#### 17", "eighteen"], prompt_id=["test/0"] * 3)
    assert [x.reward for x in s] == [1.0, 0.0, 0.0]
    strict = get_task("gsm8k-strict", data=str(DATA))
    assert strict.reward([""], ["She makes $18."], prompt_id=["test/0"]) == [0.0]
    few = get_task("gsm8k", data=str(DATA), few_shot=8).prompts("test", limit=1)[0]["prompt"]
    assert few.count("Question: ") == 9 and few.count("#### ") == 8


def test_hh_pairs():
    t = get_task("hh-harmless", data=str(DATA))
    assert t.splits() == {"train": 1803, "test": 509, "all": 2312}
    with gzip.open(DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt") as f:
        raw = [json.loads(x) for x in f]
    pairs = t.pairs("all")
    assert len(pairs) == 2312 and pairs[0]["prompt_id"] == "hh-harmless/0"
    for p, r in zip(pairs, raw):
        assert p["prompt"].endswith("\n\nAssistant:")
        assert p["prompt"] + p["chosen"] == r["chosen"]
        assert p["prompt"] + p["rejected"] == r["rejected"]
    assert t.reward(["x"], ["y"], prompt_id=["hh-harmless/0"]) == [None]
    # The prompt stops at the assistant turn even when both answers start alike.
    assert split_pair("\n\nHuman: hi\n\nAssistant: I am", "\n\nHuman: hi\n\nAssistant: I was") == (
        "\n\nHuman: hi\n\nAssistant:", " I am", " I was")  # fmt: skip
    assert split_pair("abc", "abd") is None


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_custom_code_task(tmp_path):
    f = _jsonl(tmp_path / "code.jsonl", [
        {"id": "sq", "prompt": "def sq(x):\n", "tests": "assert sq(3) == 9"},
        {"id": "neg", "prompt": "def neg(x):\n", "tests": "assert neg(2) == -2", "split": "dev"},
    ])  # fmt: skip
    t = get_task(str(f), sandbox=FAST)
    try:
        assert t.splits() == {"all": 1, "dev": 1}
        s = t.score(["", "", ""], ["    return x * x\n", "    return x + x\n", "    return -x\n"],
                    prompt_id=["sq", "sq", "neg"])  # fmt: skip
        assert [x.status for x in s] == ["passed", "failed", "passed"]
    finally:
        t.close()


def test_custom_answer_task(tmp_path):
    f = _jsonl(tmp_path / "qa.jsonl", [
        {"id": "1", "prompt": "2+2=", "answer": 4},
        {"id": "2", "prompt": "Capital of France?", "answer": "Paris"},
    ])  # fmt: skip
    t = get_task(str(f))
    got = t.reward(["", "", "", ""], ["it is 4.0", "5", " Paris ", "paris"],
                   prompt_id=["1", "1", "2", "2"])  # fmt: skip
    assert got == [1.0, 0.0, 1.0, 0.0]


def test_custom_callable_and_task_class(tmp_path, monkeypatch):
    mod = tmp_path / "myreward.py"
    mod.write_text(textwrap.dedent("""
        from qprobe.tasks import Task

        def length(prompts, completions, **columns):
            return [float(len(c)) if c else None for c in completions]

        class Echo(Task):
            name = "echo"
            def __init__(self, data=None):
                self.data = data
            def splits(self):
                return {"all": 1}
            def _load(self, split):
                return [{"id": "0", "prompt": "say hi"}]
    """))
    t = get_task(f"{mod}:length")
    assert t.reward(["a", "b"], ["xyz", ""], prompt_id=["0", "1"]) == [3.0, None]
    with pytest.raises(QProbeError, match="has no prompts"):
        t.prompts("all")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_task("myreward:Echo", data="d").prompts("all")[0]["prompt"] == "say hi"
    with pytest.raises(QProbeError, match="no attribute"):
        get_task("myreward:missing")
    with pytest.raises(QProbeError, match="cannot import"):
        get_task("no_such_module_xyz:f")


def test_bad_inputs_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "prompt": "p", "tests": "t"}\n{not json\n')
    with pytest.raises(QProbeError, match=r"bad.jsonl:2: not valid JSON"):
        get_task(str(bad))
    missing = _jsonl(tmp_path / "m.jsonl", [{"id": "1", "prompt": "p", "tests": "t"},
                                            {"id": "2", "tests": "t"}])  # fmt: skip
    with pytest.raises(QProbeError, match=r"m.jsonl:2: missing field\(s\) prompt"):
        get_task(str(missing))
    with pytest.raises(QProbeError, match="rows need"):
        get_task(str(_jsonl(tmp_path / "x.jsonl", [{"id": "1", "prompt": "p"}])))
    t = get_task("gsm8k", data=str(DATA))
    with pytest.raises(QProbeError, match="2 prompts but 1 completions"):
        t.score(["a", "b"], ["c"], prompt_id=["test/0", "test/1"])
    with pytest.raises(QProbeError, match="unknown prompt_id"):
        t.score(["a"], ["c"], prompt_id=["test/99999"])


def test_download_only_when_asked(tmp_path, monkeypatch):
    # A file:// URL stands in for the official location (tests never touch the network).
    from qprobe.tasks import download as dl

    src = DATA / "mbpp" / "mbpp.jsonl"
    good = dl.SOURCES["mbpp"][0][2]
    monkeypatch.setitem(dl.SOURCES, "mbpp", [(src.as_uri(), "mbpp/mbpp.jsonl", good)])
    (path,) = dl.download("mbpp", tmp_path)
    assert path == tmp_path / "mbpp" / "mbpp.jsonl" and path.read_bytes() == src.read_bytes()
    assert get_task("mbpp", data=str(tmp_path)).splits()["test"] == 500
    monkeypatch.setitem(dl.SOURCES, "mbpp", [(src.as_uri(), "mbpp/other.jsonl", "0" * 64)])
    with pytest.raises(QProbeError, match="sha256"):
        dl.download("mbpp", tmp_path)
    assert sorted(p.name for p in (tmp_path / "mbpp").iterdir()) == ["mbpp.jsonl"]
    with pytest.raises(QProbeError, match="no download for 'humaneval'"):
        dl.download("humaneval", tmp_path)


def test_downloads_live_in_the_one_cache_root(tmp_path, monkeypatch):
    # $QPROBE_CACHE decides where data, models and kernels go; $XDG_CACHE_HOME does not.
    from qprobe import fileio, models
    from qprobe.tasks import download as dl
    from qprobe.tasks.base import cache_dir, data_roots

    monkeypatch.setenv("QPROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == fileio.cache_root() / "data" == tmp_path / "cache" / "data"
    assert data_roots()[-1] == cache_dir()
    assert models.cache_root is fileio.cache_root
    src = DATA / "mbpp" / "mbpp.jsonl"
    monkeypatch.setitem(dl.SOURCES, "mbpp", [(src.as_uri(), "mbpp/mbpp.jsonl", None)])
    (path,) = dl.download("mbpp")
    assert path == tmp_path / "cache" / "data" / "mbpp" / "mbpp.jsonl" and path.is_file()
    assert not (tmp_path / "xdg").exists()
