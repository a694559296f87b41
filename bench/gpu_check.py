"""Does qprobe run right on a GPU? collect / train / generate / serve on CUDA, checked against CPU.

With the embedded SmolLM2-135M (`--model default`) and a small task (times tables, 32 prompts,
k = 8, seed 0), one run of the CLI, each step a `python -m qprobe ...` subprocess:

  1. collect three rollouts folders with the same seed: CPU float32 (the reference), CUDA float32
     and CUDA at its default dtype (bfloat16);
  2. compare each CUDA folder's rows with the CPU's (`compare_folders`): the same keys and meta;
     texts equal, else the count that differ and each one's first divergent token; features of
     the equal-text rows within a relative L2 tolerance; rewards equal where texts are equal;
  3. train a `q` probe on the CPU folder and on the CUDA float32 folder (training runs on the CPU)
     and compare their scores on the CPU folder's features (Pearson r);
  4. `qprobe generate` on CUDA with the probe of the CUDA default-dtype folder;
  5. `qprobe serve` on CUDA on 127.0.0.1 (a free port): one /v1/completions request must get 200;
  6. print the collections' tokens/s side by side.

Why the texts can be compared directly: the sampler draws its uniforms from a counter-based
generator on the CPU (seed, prompt text, sample index, step), never from a device RNG, so the same
seed gives the same samples on any device up to the logits' rounding. In float32 that rounding
is tiny, so texts must match except where two tokens nearly tie (at most `--max-diverged` of the
rows may differ); in bfloat16 a near tie flips more often and everything after it differs, so
the default-dtype run reports how many rows differ and fails only on the features and rewards
of the rows that agree.

    bash bench/gpu_check.sh                 # the check (under 5 minutes on one GPU)
    python bench/gpu_check.py --compare A B # compare two rollouts folders (no GPU needed)
    python bench/gpu_check.py --device cpu --model PATH  # the same flow CPU vs CPU (tests)

Exit status: 0 all checks passed; 1 a check failed (one line says which); 3 no CUDA device, with
nothing run. The work folder is removed after a pass (`--keep` keeps it) and kept after a failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NO_CUDA = 3
# Feature tolerance (max relative L2 over the rows whose texts agree) by weights dtype: float32
# differs from the CPU by summation order only; bfloat16 rounds every activation to 8 bits.
FEATURE_TOL = {"float32": 1e-3, "default": 0.1}
MAX_DIVERGED = 0.1  # float32: the largest fraction of rows whose texts may differ (near ties)
MIN_PROBE_R = 0.95  # Pearson r of the two probes' scores on the reference features
META_IGNORED = {"format", "created", "updated", "progress", "summary"}


class CheckFailed(Exception):
    """One check failed; the message is the one line the script prints."""


# --- comparing two rollouts folders ---------------------------------------------------------


@dataclass
class RowComparison:
    """How the rows of rollouts folder `b` compare with those of the reference `a`."""

    rows: int  # rows in a
    same_text: int  # rows whose completions are equal
    diverged: list[tuple[str, int, int, str]] = field(default_factory=list)  # (prompt_id,
    # sample_idx, first position that differs, "token" or "char")
    feature_rel_l2: float = math.nan  # max over the equal-text rows of |fb - fa| / |fa|
    feature_min_cos: float = math.nan  # min cosine over the equal-text rows
    reward_mismatch: list[tuple[str, int]] = field(default_factory=list)  # equal text, other reward
    structure: list[str] = field(default_factory=list)  # keys or meta differ: nothing comparable

    def problems(self, feature_tol: float, max_diverged: float | None) -> list[str]:
        """What fails at these tolerances (empty: the folders agree); max_diverged None: any
        number of rows may differ in text."""
        if self.structure:
            return list(self.structure)
        out = []
        if max_diverged is not None and len(self.diverged) > max_diverged * self.rows:
            out.append(f"{len(self.diverged)} of {self.rows} texts differ (more than "
                       f"{max_diverged:.0%}); first at {self._first()}")
        if self.same_text == 0:
            out.append("no row has the same text in both: features cannot be compared")
        elif not self.feature_rel_l2 <= feature_tol:
            out.append(f"features differ: max relative L2 {self.feature_rel_l2:.3g} > "
                       f"{feature_tol:g} (min cosine {self.feature_min_cos:.6f})")
        if self.reward_mismatch:
            pid, j = self.reward_mismatch[0]
            out.append(f"{len(self.reward_mismatch)} rows with equal texts have different "
                       f"rewards, first {pid}#{j}")
        return out

    def _first(self) -> str:
        pid, j, pos, unit = self.diverged[0]
        return f"{pid}#{j} {unit} {pos}"

    def summary(self) -> str:
        """One line: texts, features, rewards."""
        s = f"{self.same_text}/{self.rows} texts equal"
        if self.diverged:
            pos = sorted(p for _, _, p, _ in self.diverged)
            s += (f" ({len(self.diverged)} differ, first divergent {self.diverged[0][3]} "
                  f"min {pos[0]} median {pos[len(pos) // 2]}; first at {self._first()})")
        if self.same_text:
            s += (f"; features max rel L2 {self.feature_rel_l2:.3g}, min cos "
                  f"{self.feature_min_cos:.6f}")
        s += f"; rewards {'equal' if not self.reward_mismatch else 'DIFFER'} where texts are"
        return s


def _first_divergence(a_ids, b_ids, a_text: str, b_text: str) -> tuple[int, str]:
    """Index of the first token (or, without token ids, character) where two samples differ."""
    if a_ids is not None and b_ids is not None:
        x, y = list(a_ids), list(b_ids)
        unit = "token"
    else:
        x, y = a_text, b_text
        unit = "char"
    n = min(len(x), len(y))
    return next((i for i in range(n) if x[i] != y[i]), n), unit


def compare_folders(a: str | Path, b: str | Path) -> RowComparison:
    """Compare rollouts folder `b` row by row with the reference `a` (same (prompt_id,
    sample_idx) keys and meta expected; rows may be stored in any order)."""
    from qprobe.rollouts import Rollouts

    a, b = Path(a), Path(b)
    ra, rb = Rollouts(a), Rollouts(b)
    ma, mb = ({k: v for k, v in r.meta.items() if k not in META_IGNORED} for r in (ra, rb))
    out = RowComparison(rows=len(ra), same_text=0)
    diff = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
    if diff:
        out.structure.append(f"meta differs in {', '.join(diff)}: not the same collection")
    ka = list(zip(ra.prompt_ids.tolist(), ra.sample_idx.tolist()))
    kb = list(zip(rb.prompt_ids.tolist(), rb.sample_idx.tolist()))
    where_b = {key: i for i, key in enumerate(kb)}
    if set(ka) != set(kb):
        only = sorted(set(ka) ^ set(kb))
        out.structure.append(f"rows differ: {len(set(ka) - set(kb))} only in {a.name}, "
                             f"{len(set(kb) - set(ka))} only in {b.name} (e.g. {only[0]})")
    if out.structure:
        return out
    ta, tb = ra.column("completion"), rb.column("completion")
    ida, idb = ([None] * len(r) if "token_ids" not in r.table.column_names else
                r.column("token_ids") for r in (ra, rb))
    wa, wb = ra.rewards, rb.rewards
    same_a, same_b = [], []
    for i, key in enumerate(ka):
        j = where_b[key]
        if ta[i] != tb[j]:
            pos, unit = _first_divergence(ida[i], idb[j], ta[i], tb[j])
            out.diverged.append((key[0], int(key[1]), pos, unit))
            continue
        same_a.append(i)
        same_b.append(j)
        if not (wa[i] == wb[j] or (np.isnan(wa[i]) and np.isnan(wb[j]))):
            out.reward_mismatch.append((key[0], int(key[1])))
    out.same_text = len(same_a)
    if same_a and ra.feature_spec is not None and rb.feature_spec is not None:
        fa = np.asarray(ra.features[same_a], dtype=np.float64)  # [S, D]
        fb = np.asarray(rb.features[same_b], dtype=np.float64)  # [S, D]
        if fa.shape != fb.shape:
            out.structure.append(f"feature shapes differ: {fa.shape} vs {fb.shape}")
            return out
        na, nb = np.linalg.norm(fa, axis=1), np.linalg.norm(fb, axis=1)  # [S]
        rel = np.linalg.norm(fb - fa, axis=1) / np.maximum(na, 1e-30)
        cos = (fa * fb).sum(1) / np.maximum(na * nb, 1e-30)
        out.feature_rel_l2, out.feature_min_cos = float(rel.max()), float(cos.min())
    return out


# --- the GPU run ----------------------------------------------------------------------------


class Runner:
    """Runs qprobe CLI steps as subprocesses within one time budget."""

    def __init__(self, work: Path, budget_s: float) -> None:
        self.work = work
        self.deadline = time.monotonic() + budget_s
        self.budget_s = budget_s
        self.env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout's qprobe
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, self.env.get("PYTHONPATH")]))

    def left(self, step: str) -> float:
        s = self.deadline - time.monotonic()
        if s <= 0:
            raise CheckFailed(f"{step}: over the {self.budget_s:.0f} s budget")
        return s

    def qprobe(self, step: str, *args: str) -> str:
        """Run `python -m qprobe ARGS`; returns stdout, or fails with stderr's last line."""
        cmd = [sys.executable, "-m", "qprobe", *args]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=self.env,
                               timeout=self.left(step))
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"{step}: over the {self.budget_s:.0f} s budget") from None
        if p.returncode != 0:
            raise CheckFailed(f"{step}: exit {p.returncode}: {_last_line(p.stderr)}")
        return p.stdout


def _last_line(text: str) -> str:
    lines = [s for s in text.strip().splitlines() if s.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _say(msg: str) -> None:
    print(f"gpu_check: {msg}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")[:200]}


def serve_once(run: Runner, model: str, probe: Path, device: str, prompt: str,
               max_tokens: int) -> str:
    """Start `qprobe serve` on loopback, send one completion request, stop it; returns the
    answer's text. Fails unless the answer is a 200 with a text."""
    port = _free_port()
    log = run.work / "serve.log"
    cmd = [sys.executable, "-m", "qprobe", "serve", "--model", model, "--probe", str(probe),
           "--device", device, "--host", "127.0.0.1", "--port", str(port), "--name", "gpu-check",
           "--k", "4", "--max-tokens", str(max_tokens), "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=run.env,
                                start_new_session=True)
    try:
        while True:  # up: /health answers (the model loads first)
            if proc.poll() is not None:
                raise CheckFailed(f"serve: exited {proc.returncode} before answering: "
                                  f"{_last_line(log.read_text())}")
            run.left("serve (start)")
            try:
                if _http(f"{url}/health", timeout=2)[0] == 200:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        status, body = _http(f"{url}/v1/completions",
                             {"model": "gpu-check", "prompt": prompt, "max_tokens": max_tokens,
                              "seed": 0}, timeout=run.left("serve (request)"))
        if status != 200:
            raise CheckFailed(f"serve: /v1/completions answered {status}: {body}")
        text = body.get("choices", [{}])[0].get("text")
        if not isinstance(text, str):
            raise CheckFailed(f"serve: the 200 answer has no choices[0].text: {body}")
        return text
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _probe_agreement(ref: Path, probe_a: Path, probe_b: Path) -> float:
    """Pearson r of two probes' scores on the reference folder's features (1.0 when both are
    constant and equal)."""
    from qprobe.probe import Probe
    from qprobe.rollouts import Rollouts

    r = Rollouts(ref)
    sa = Probe.load(probe_a).score_rollouts(r).astype(np.float64)
    sb = Probe.load(probe_b).score_rollouts(r).astype(np.float64)
    if sa.std() < 1e-9 or sb.std() < 1e-9:
        return 1.0 if np.allclose(sa, sb, atol=1e-6) else 0.0
    return float(np.corrcoef(sa, sb)[0, 1])


def gpu_run(a: argparse.Namespace, work: Path) -> None:
    """The whole check; raises CheckFailed with the first failure."""
    run = Runner(work, a.budget)
    t0 = time.monotonic()
    common = ["--model", a.model, "--task", a.task, "--k", str(a.k), "--limit", str(a.limit),
              "--max-new-tokens", str(a.max_new_tokens), "--seed", str(a.seed),
              "--feature-dtype", "float32", "--no-progress"]
    if a.split:
        common += ["--split", a.split]
    # (name, device, dtype or None = the device's default); the first is the reference.
    runs = [("ref-cpu-float32", "cpu", "float32"), (f"{a.device}-float32", a.device, "float32")]
    if a.device != "cpu":  # on the CPU the default dtype is float32: nothing new
        runs.append((f"{a.device}-default", a.device, None))
    speed = {}
    for name, dev, dtype in runs:
        t = time.monotonic()
        out = run.qprobe(f"collect {name}", "collect", *common, "--device", dev,
                         *(["--dtype", dtype] if dtype else []), "--out", str(work / name))
        s = json.loads(out.strip().splitlines()[-1])
        speed[name] = s
        _say(f"collect {name}: {s['rows']} rows, mean reward {s['mean_reward']}, "
             f"{s['tokens_per_s']} tok/s ({time.monotonic() - t:.0f} s with start-up)")
    ref = work / runs[0][0]
    for name, _, dtype in runs[1:]:
        c = compare_folders(ref, work / name)
        _say(f"rows {name} vs {runs[0][0]}: {c.summary()}")
        if dtype is None and c.diverged:
            _say(f"  ({len(c.diverged)} texts differ because {a.device}'s default dtype rounds "
                 "the logits to bfloat16: a near tie flips and the rest of the sample follows; "
                 "the float32 run above is the one held to equal texts)")
        bad = c.problems(FEATURE_TOL["float32" if dtype == "float32" else "default"],
                         a.max_diverged if dtype == "float32" else None)
        if bad:
            raise CheckFailed(f"rows {name} vs {runs[0][0]}: {bad[0]}")

    probes = {}
    for name, _, _ in runs:
        probes[name] = work / f"probe-{name}"
        run.qprobe(f"train {name}", "train", str(work / name), "--objective", "q",
                   "--out", str(probes[name]), "--quiet")
    r = _probe_agreement(ref, probes[runs[0][0]], probes[runs[1][0]])
    _say(f"train: probes on {runs[0][0]} and {runs[1][0]} score the reference rows with "
         f"Pearson r {r:.6f}")
    if not r >= MIN_PROBE_R:
        raise CheckFailed(f"train: the two probes disagree (Pearson r {r:.4f} < {MIN_PROBE_R})")

    served_probe = probes[runs[-1][0]]  # the features the device gives by default
    from qprobe.rollouts import Rollouts

    prompt = Rollouts(ref).column("prompt")[0]
    out = run.qprobe("generate", "generate", "--model", a.model, "--probe", str(served_probe),
                     "--device", a.device, "--k", "4", "--max-new-tokens", str(a.max_new_tokens),
                     "--task", a.task, "--seed", str(a.seed), "--all", "--", prompt)
    try:
        text = json.loads(out)["text"]
    except (ValueError, KeyError, TypeError):
        raise CheckFailed(f"generate: no JSON with a text on stdout: {_last_line(out)}") from None
    _say(f"generate on {a.device}: {prompt!r} -> {text!r}")
    text = serve_once(run, a.model, served_probe, a.device, prompt, a.max_new_tokens)
    _say(f"serve on {a.device}: 200, {text!r}")

    base = speed[runs[0][0]]["tokens_per_s"] or 0.0
    _say("collection tokens/s (sampling only, the model loaded):")
    for name, s in speed.items():
        tps = s["tokens_per_s"] or 0.0
        ratio = f"  {tps / base:5.2f}x {runs[0][0]}" if base and name != runs[0][0] else ""
        _say(f"  {name:<16} {tps:10.1f}{ratio}")
    _say(f"OK in {time.monotonic() - t0:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", nargs=2, metavar=("REF", "OTHER"), default=None,
                   help="only compare two rollouts folders (no GPU needed)")
    p.add_argument("--feature-tol", type=float, default=FEATURE_TOL["float32"],
                   help="--compare: largest relative L2 of features on equal-text rows")
    p.add_argument("--max-diverged", type=float, default=MAX_DIVERGED,
                   help="largest fraction of rows whose texts may differ in float32")
    p.add_argument("--device", default="cuda", help="device to check against the CPU (cuda)")
    p.add_argument("--model", default="default", help="model (the embedded SmolLM2-135M)")
    p.add_argument("--task", default="times-tables", help="task name")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, default=32, help="prompts")
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=300.0, help="seconds for the whole check")
    p.add_argument("--out", default=None, help="work folder (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work folder after a pass")
    a = p.parse_args(argv)

    if a.compare:
        try:
            c = compare_folders(*a.compare)
        except Exception as e:  # a bad folder: one line
            print(f"gpu_check: compare: {e}".splitlines()[0], file=sys.stderr)
            return 1
        _say(c.summary())
        bad = c.problems(a.feature_tol, a.max_diverged)
        if bad:
            print(f"gpu_check: FAILED: {bad[0]}", file=sys.stderr)
            return 1
        return 0

    if a.device.startswith("cuda"):  # before any work
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing run",
                  file=sys.stderr)
            return NO_CUDA
        _say(f"device {torch.cuda.get_device_name(a.device)}, torch {torch.__version__}")
    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    if a.out and work.exists() and any(work.iterdir()):
        print(f"gpu_check: {work} is not empty; give a new --out", file=sys.stderr)
        return 1
    work.mkdir(parents=True, exist_ok=True)
    try:
        gpu_run(a, work)
    except CheckFailed as e:
        print(f"gpu_check: FAILED at {e} (work folder kept: {work})", file=sys.stderr)
        return 1
    except Exception as e:  # a bug here or an output it did not expect: still one line
        print(f"gpu_check: FAILED: {type(e).__name__}: {e} (work folder kept: {work})"
              .splitlines()[0], file=sys.stderr)
        return 1
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
