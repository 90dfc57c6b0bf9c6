"""runtime.py: what --amp auto means on each kind of CPU (torch's capability queries patched), and what it says."""
import pytest
import torch

import runtime

CPU = torch.device("cpu")


def cpu_kind(monkeypatch, capability, avx512_bf16, amx=False):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize("capability, avx512_bf16, amx, native", [
    ("AVX2", False, False, False),          # e.g. AMD EPYC (Zen 2/3), most laptops
    ("AVX512", False, False, False),        # AVX512 without BF16 (Skylake, Cascade Lake): emulated
    ("AVX512", True, False, True),          # AVX512-BF16 (Zen 4, Cooper Lake)
    ("AVX512", False, True, True),          # AMX tiles (Sapphire Rapids)
    ("AVX2", True, False, False),           # bf16 hardware, but ATen forced to its AVX2 kernels
    ("DEFAULT", False, False, False),
])
def test_auto_amp_on_cpu_follows_native_bf16(monkeypatch, capability, avx512_bf16, amx, native):
    cpu_kind(monkeypatch, capability, avx512_bf16, amx)
    assert runtime.cpu_has_native_bf16() is native
    dtype, scaler = runtime.resolve_amp("auto", CPU)
    assert dtype == (torch.bfloat16 if native else None) and scaler is False
    text, warning = runtime.describe_amp("auto", CPU)
    assert text == ("amp bf16 (CPU with native bf16)" if native else "amp off (CPU without native bf16)")
    assert warning is None


@pytest.mark.parametrize("native", [False, True])
def test_explicit_bf16_works_everywhere_and_warns_only_where_emulated(monkeypatch, native):
    cpu_kind(monkeypatch, "AVX512" if native else "AVX2", native)
    assert runtime.resolve_amp("bf16", CPU) == (torch.bfloat16, False)
    text, warning = runtime.describe_amp("bf16", CPU)
    assert text == "amp bf16 (--amp bf16)"
    assert (warning is None) is native
    if not native:
        assert "without native bf16" in warning and "--amp auto" in warning
    assert runtime.resolve_amp("off", CPU) == (None, False)
    with pytest.raises(runtime.UsageError, match="fp16 needs a CUDA"):
        runtime.resolve_amp("fp16", CPU)
