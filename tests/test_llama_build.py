"""The test server's llama.cpp build is portable: no AVX-512 or AMX code, and it answers a
multi-token prompt (a native build on an AMX Xeon crashed there; see requirements-test.txt)."""

from __future__ import annotations

import pytest

import llama_build

pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `bash setup.sh --dev`")


def test_compiled_without_avx512_or_amx() -> None:
    features = llama_build.compiled_features()
    assert features, "llama_print_system_info() listed no CPU features"
    assert llama_build.feature_problems(features) == [], features


def test_no_amx_kernel_in_libggml_cpu(tmp_path) -> None:
    lib = llama_build.cpu_library()
    assert not llama_build.has_amx_kernel(lib), f"{lib} exports ggml_backend_amx_mul_mat"
    # The check sees the mangled export a native AMX build carries.
    fake = tmp_path / "libggml-cpu.so"
    fake.write_bytes(b"\x00_Z24ggml_backend_amx_mul_matPK19ggml_compute_paramsP11ggml_tensor\x00")
    assert llama_build.has_amx_kernel(fake)


def test_feature_problems_flags_a_native_build() -> None:
    # What a native build on an AMX Xeon reports (compile-time features).
    native = {"SSE3": "1", "AVX": "1", "AVX2": "1", "F16C": "1", "FMA": "1", "BMI2": "1",
              "AVX512": "1", "AVX512_VNNI": "1", "AMX_INT8": "1"}
    assert llama_build.feature_problems(native) == [
        "AVX512 compiled in", "AVX512_VNNI compiled in", "AMX_INT8 compiled in"]
    assert llama_build.feature_problems({"AVX": "1"}) == [
        "AVX2 missing", "FMA missing", "F16C missing"]


@pytest.mark.slow
def test_multi_token_prompt_answers() -> None:
    rc, last = llama_build.multi_token_prompt()
    assert rc == 0, f"exit {rc}: {last}"
    assert last.startswith("'") and len(last) > 2, last
