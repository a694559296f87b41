"""`qprobe.backends.llama_server`: a llama.cpp server that cannot start is one clear error, and
nothing is left running."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")

from qprobe.backends.llama_server import LlamaCppServer  # noqa: E402
from qprobe.errors import QProbeError  # noqa: E402


def test_a_server_that_cannot_load_its_model_is_one_error(tmp_path) -> None:
    missing = tmp_path / "no-such-model.gguf"
    with pytest.raises(QProbeError, match=r"llama_cpp.server exited with \d+ .*log: ") as e:
        LlamaCppServer([{"model": str(missing), "model_alias": "m"}], tmp_path / "srv",
                       ready_timeout=120)
    assert "\n" not in str(e.value)
    assert (tmp_path / "srv" / "llama_server.log").is_file()
    assert not (tmp_path / "srv" / "llama_server.json").exists()  # it held the key
