"""Execution-based free signals for code candidates (docs/verifier-execution.md).

- `calls.py`     the call expressions of a prompt's shown tests and of model-written asserts
                 (read with `ast` in this process; nothing generated runs here);
- `programs.py`  the sandbox programs that run them, and how their verdicts and output become
                 error classes, execution signatures and pass sets;
- `agreement.py` pure maths on those: MBR-exec cluster sizes, CodeT scores, the probe extras;
- `gentests.py`  model-written tests: the prompt, parsing into asserts, the resumable store;
- `signals.py`   the stages that fill a rollouts folder's columns (`qprobe signals`).
"""
