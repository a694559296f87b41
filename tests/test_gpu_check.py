"""bench/gpu_check.sh: refuses cleanly without CUDA; its row comparison on synthetic folders;
the whole flow CPU vs CPU on the tiny model."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qprobe.cli import main
from qprobe.features import FeatureSpec
from qprobe.rollouts import write_rollouts
from tiny_lm import save_tiny

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
REFUSAL = "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing run"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gc = _module()


def _env() -> dict:
    return {**os.environ, "PYTHON": sys.executable,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                        os.environ.get("PYTHONPATH")]))}


def test_refuses_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal path does not apply")
    out = tmp_path / "work"
    p = subprocess.run(["bash", str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert p.returncode == 3
    assert p.stderr.strip() == REFUSAL
    assert p.stdout == ""
    assert not out.exists()  # nothing run, nothing written


# --- the row comparison on synthetic folders --------------------------------------------------

N_PROMPTS, K, DIM = 3, 2, 16


def _rows(texts=None, rewards=None, drop=None):
    rows = []
    for p in range(N_PROMPTS):
        for j in range(K):
            i = p * K + j
            ids = [10 + i, 20 + i, 30 + i, 40 + i]
            rows.append({"prompt_id": f"p{p}", "sample_idx": j, "prompt": f"prompt {p}",
                         "completion": f"answer {i}", "reward": float(i % 2), "token_ids": ids})
    for i, (text, ids) in (texts or {}).items():
        rows[i]["completion"], rows[i]["token_ids"] = text, ids
    for i, r in (rewards or {}).items():
        rows[i]["reward"] = r
    return [r for i, r in enumerate(rows) if i != drop]


def _feats(scale=None):
    x = np.random.default_rng(0).standard_normal((N_PROMPTS * K, DIM)).astype(np.float32)
    for i, rel in (scale or {}).items():  # perturb row i by a relative L2 of `rel`
        d = np.zeros(DIM, np.float32)
        d[0] = rel * np.linalg.norm(x[i])
        x[i] = x[i] + d
    return x


def _folder(path, rows=None, feats=None, model="synthetic"):
    rows = _rows() if rows is None else rows
    feats = _feats() if feats is None else feats
    keep = [int(r["prompt_id"][1:]) * K + r["sample_idx"] for r in rows]
    meta = {"model": model, "task": "synthetic", "split": "train", "k": K,
            "sampling": {"temperature": 0.8, "seed": 0}}
    spec = FeatureSpec(model=model, layer=0, position="last", dim=DIM, dtype="float32")
    write_rollouts(path, rows, feats[keep], meta=meta, feature_spec=spec)
    return path


@pytest.fixture
def ref(tmp_path):
    return _folder(tmp_path / "ref")


def test_equal_folders_agree(ref, tmp_path):
    # Same rows stored in another order: matched by key, not position.
    rows, feats = _rows(), _feats()
    order = list(reversed(range(len(rows))))
    other = tmp_path / "other"
    spec = FeatureSpec(model="synthetic", layer=0, position="last", dim=DIM, dtype="float32")
    write_rollouts(other, [rows[i] for i in order], feats[order],
                   meta={"model": "synthetic", "task": "synthetic", "split": "train", "k": K,
                         "sampling": {"temperature": 0.8, "seed": 0}}, feature_spec=spec)
    c = gc.compare_folders(ref, other)
    assert (c.rows, c.same_text, c.diverged, c.reward_mismatch) == (6, 6, [], [])
    assert c.feature_rel_l2 == 0.0 and c.feature_min_cos == pytest.approx(1.0)
    assert c.problems(1e-3, 0.0) == []


def test_perturbed_feature_is_measured_and_fails_the_tolerance(ref, tmp_path):
    other = _folder(tmp_path / "other", feats=_feats({3: 0.01}))
    c = gc.compare_folders(ref, other)
    assert c.same_text == 6
    assert c.feature_rel_l2 == pytest.approx(0.01, rel=1e-3)
    assert c.problems(0.02, 0.0) == []
    (bad,) = c.problems(1e-3, 0.0)
    assert bad.startswith("features differ: max relative L2 0.01 > 0.001")


def test_changed_text_counts_the_first_divergent_token(ref, tmp_path):
    # Row 4 samples another token at position 2; its feature is far off but is not compared
    # (another text has another feature).
    other = _folder(tmp_path / "other", rows=_rows(texts={4: ("answer X", [14, 24, 99, 44])}),
                    feats=_feats({4: 5.0}))
    c = gc.compare_folders(ref, other)
    assert c.same_text == 5
    assert c.diverged == [("p2", 0, 2, "token")]
    assert c.feature_rel_l2 == 0.0
    assert c.problems(1e-3, None) == []  # bfloat16: differing texts are reported, not failed
    assert c.problems(1e-3, 0.5) == []  # 1 of 6 <= 50%
    (bad,) = c.problems(1e-3, 0.1)
    assert bad == "1 of 6 texts differ (more than 10%); first at p2#0 token 2"
    assert "5/6 texts equal (1 differ, first divergent token min 2" in c.summary()


def test_text_without_token_ids_diverges_by_character(ref, tmp_path):
    rows = _rows(texts={1: ("answer 1 and more", None)})
    c = gc.compare_folders(ref, _folder(tmp_path / "other", rows=rows))
    assert c.diverged == [("p0", 1, len("answer 1"), "char")]


def test_reward_differing_on_equal_text_fails(ref, tmp_path):
    c = gc.compare_folders(ref, _folder(tmp_path / "other", rows=_rows(rewards={2: 1.0})))
    assert c.reward_mismatch == [("p1", 0)]
    (bad,) = c.problems(1e-3, 0.0)
    assert bad == "1 rows with equal texts have different rewards, first p1#0"


def test_other_keys_or_meta_are_not_compared(ref, tmp_path):
    c = gc.compare_folders(ref, _folder(tmp_path / "fewer", rows=_rows(drop=5)))
    (bad,) = c.problems(1.0, None)
    assert bad.startswith("rows differ: 1 only in ref, 0 only in fewer")
    c = gc.compare_folders(ref, _folder(tmp_path / "model", model="another"))
    assert c.problems(1.0, None)[0] == "meta differs in feature_spec, model: not the same collection"


def test_compare_command_exit_status_and_line(ref, tmp_path):
    same = _folder(tmp_path / "same")
    off = _folder(tmp_path / "off", feats=_feats({0: 0.01}))
    script = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--compare"]
    p = subprocess.run([*script, str(ref), str(same)], capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("gpu_check: 6/6 texts equal; features max rel L2 0,")
    p = subprocess.run([*script, str(ref), str(off)], capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "gpu_check: FAILED: features differ: max relative L2 0.01 > 0.001 (min cosine "
        + p.stderr.split("min cosine ")[1].strip()]
    p = subprocess.run([*script, str(ref), str(tmp_path / "missing")], capture_output=True,
                       text=True, env=_env(), timeout=120)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
    assert "rollouts folder not found" in p.stderr


def test_a_failing_step_is_one_line_and_keeps_the_work_folder(tmp_path):
    work = tmp_path / "work"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu",
                        "--task", "no-such-task", "--out", str(work)],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 1
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("gpu_check: FAILED at collect ref-cpu-float32: exit 2: ")
    assert "no-such-task" in line and line.endswith(f"(work folder kept: {work})")
    assert work.is_dir()


# --- the flags the check drives: collect --dtype, generate/serve --device --------------------


def test_dtype_and_device_flags_reach_the_model(tmp_path, monkeypatch, capsys):
    import qprobe.backends as backends

    model = save_tiny(tmp_path / "tiny")
    common = ["collect", "--model", str(model), "--task", "times-tables", "--split", "train",
              "--limit", "3", "--k", "2", "--max-new-tokens", "6", "--feature-dtype", "float32",
              "--device", "cpu", "--no-progress"]
    assert main([*common, "--dtype", "float32", "--out", str(tmp_path / "f32")]) == 0
    assert main([*common, "--out", str(tmp_path / "default")]) == 0  # float32 on the CPU
    assert main([*common, "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0
    same = gc.compare_folders(tmp_path / "f32", tmp_path / "default")
    assert same.same_text == 6 and same.feature_rel_l2 == 0.0
    bf16 = gc.compare_folders(tmp_path / "f32", tmp_path / "bf16")
    assert bf16.structure == []  # the dtype is not part of the folder's identity
    assert bf16.diverged or bf16.feature_rel_l2 > 0  # the weights really were bfloat16
    assert main(["collect", "--model", "http://127.0.0.1:9/v1", "--task", "times-tables",
                 "--split", "train", "--dtype", "float32", "--out", str(tmp_path / "api")]) == 2
    assert "--dtype applies to a local --model or --embedder" in capsys.readouterr().err

    assert main(["train", str(tmp_path / "f32"), "--objective", "q", "--out",
                 str(tmp_path / "probe"), "--quiet"]) == 0
    seen = []
    real = backends.load_model

    def recording(*args, **kw):
        seen.append(kw.get("device"))
        return real(*args, **kw)

    monkeypatch.setattr(backends, "load_model", recording)
    assert main(["generate", "--model", str(model), "--probe", str(tmp_path / "probe"),
                 "--device", "cpu", "--k", "2", "--max-new-tokens", "4", "hi"]) == 0
    from qprobe.serve.models import load_served

    load_served(str(model), [], probe_args=[str(tmp_path / "probe")], device="cpu")
    assert seen == ["cpu", "cpu"]


# --- the whole flow, CPU against CPU -----------------------------------------------------------


@pytest.mark.slow
def test_whole_check_cpu_vs_cpu_on_the_tiny_model(tmp_path):
    """collect x2, compare, train x2, generate, serve on loopback: the flow the GPU run takes,
    with the CPU standing in for the device (same seed: identical rows)."""
    model = save_tiny(tmp_path / "tiny")
    work = tmp_path / "work"
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--model",
         str(model), "--limit", "3", "--k", "2", "--max-new-tokens", "6", "--out", str(work),
         "--budget", "1200"],
        capture_output=True, text=True, env=_env(), timeout=1300)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert "gpu_check: rows cpu-float32 vs ref-cpu-float32: 6/6 texts equal; features max rel " \
           "L2 0, min cos 1.000000; rewards equal where texts are" in lines
    assert any(s.startswith("gpu_check: generate on cpu: ") for s in lines)
    assert any(s.startswith("gpu_check: serve on cpu: 200, ") for s in lines)
    assert lines[-1].startswith("gpu_check: OK in ")
    assert not work.exists()  # removed after a pass
