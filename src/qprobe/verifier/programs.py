"""Sandbox programs for the execution signals, and how their verdicts are read back.

The program is the candidate (prompt + completion + the task's setup code) followed by a fixed
suffix that runs each input (a call source: its result's repr is hashed) and each check (an
assert: passed or not) under its own time limit (SIGALRM); what an input prints is part of its
outcome (a docstring example may print), other prints are swallowed; one line `MARK + json` is
printed at the very end. The line is read only from a
program the sandbox saw run to the end (verdict `passed`), so a crash, a timeout or an early
exit never yields outputs. The suffix is trusted text; everything else is untrusted and runs
only in the sandbox (qprobe.sandbox).
"""

from __future__ import annotations

import json

from qprobe.sandbox import Verdict

MARK = "@@qprobe-exec@@"
SYNTAX = ("SyntaxError", "IndentationError", "TabError")

SUFFIX = '''
import json as _qp_json, hashlib as _qp_hashlib, io as _qp_io, signal as _qp_signal, sys as _qp_sys


class _QpTimeout(BaseException):
    pass


class _QpNull:
    def write(self, s):
        return len(s)

    def flush(self):
        pass


def _qp_alarm(signum, frame):
    raise _QpTimeout()


def _qp_run(src, expr):
    _qp_sys.stdout = printed = _qp_io.StringIO()
    _qp_signal.setitimer(_qp_signal.ITIMER_REAL, {per_step!r})
    try:
        code = compile(src, "<input>", "eval" if expr else "exec")
        value = eval(code, globals())
        if not expr:
            return ""
        seen = repr(value) + " printed " + repr(printed.getvalue())  # result and what it printed
        return "=" + _qp_hashlib.sha256(seen.encode("utf-8", "replace")).hexdigest()[:16]
    except _QpTimeout:
        return "!Timeout"
    except BaseException as e:
        return "!" + type(e).__name__
    finally:
        _qp_signal.setitimer(_qp_signal.ITIMER_REAL, 0)
        _qp_sys.stdout = _QpNull()


def _qp_is_expr(src):
    try:
        compile(src, "<input>", "eval")
        return True
    except SyntaxError:
        return False


_qp_signal.signal(_qp_signal.SIGALRM, _qp_alarm)
_qp_stdout, _qp_sys.stdout = _qp_sys.stdout, _QpNull()
_qp_out = [_qp_run(s, _qp_is_expr(s)) for s in {inputs!r}]
_qp_ok = [int(_qp_run(s, False) == "") for s in {checks!r}]
_qp_sys.stdout = _qp_stdout
print("\\n" + {mark!r} + _qp_json.dumps({{"out": _qp_out, "ok": _qp_ok}}))
'''


def exec_program(candidate: str, inputs: list[str], checks: list[str] = (),
                 per_step: float = 1.0) -> str:
    """The sandbox program: `candidate` (prompt + completion + setup code), then each input's
    output hash and each check's pass/fail, printed as one JSON line after MARK."""
    return candidate + "\n" + SUFFIX.format(per_step=float(per_step), inputs=list(inputs),
                                             checks=list(checks), mark=MARK)


def error_class(v: Verdict) -> str | None:
    """The class of a verdict: pass / wrong_answer (AssertionError) / exception / syntax_error /
    timeout; None for a sandbox failure (not the program's fault: computed again on resume)."""
    if v.status == "passed":
        return "pass"
    if v.status == "failed":
        return "wrong_answer"
    if v.status == "timeout":
        return "timeout"
    if v.status == "error":
        return "syntax_error" if v.detail.split(":")[0].strip() in SYNTAX else "exception"
    return None


def read_result(v: Verdict) -> dict | None:
    """{"out": [...], "ok": [...]} printed by a program that ran to the end, else None."""
    res = v.marked(MARK)
    if isinstance(res, dict) and isinstance(res.get("out"), list) \
            and isinstance(res.get("ok"), list):
        return res
    return None


def signature(v: Verdict, n_inputs: int) -> str | None:
    """The execution signature of a candidate: the JSON list of its per-input outcomes ("=hash"
    of the result's repr, "!ExceptionName", "" for a statement), or "!" + the error class when
    the program did not run to the end; None on a sandbox failure."""
    res = read_result(v)
    if res is not None and len(res["out"]) == n_inputs:
        return json.dumps(res["out"], separators=(",", ":"))
    cls = error_class(v)
    if cls is None:
        return None
    return "!" + ("no_output" if cls == "pass" else cls)


def passed_checks(v: Verdict, n_checks: int) -> list[int] | None:
    """Indices of the checks a candidate passed ([] when the program did not run to the end);
    None on a sandbox failure."""
    res = read_result(v)
    if res is not None and len(res["ok"]) == n_checks:
        return [i for i, ok in enumerate(res["ok"]) if ok == 1]
    return None if error_class(v) is None else []
