"""runtime.py: what --amp auto means on each kind of CPU and CUDA card (the hardware facts torch's own queries read
patched: CPU flags, CUDA device properties), and what it says."""
from types import SimpleNamespace

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


def test_fp16_runs_on_cpu_with_a_scaler_and_says_what_it_costs():
    """How a machine without a GPU exercises a T4's path: fp16 autocast and a GradScaler, with one warning line."""
    assert runtime.resolve_amp("fp16", CPU) == (torch.float16, True)
    text, warning = runtime.describe_amp("fp16", CPU)
    assert text == "amp fp16 (--amp fp16)"
    assert warning.startswith("warning: --amp fp16 on CPU") and "CPU time of fp32" in warning and "\n" not in warning


# ----------------------------------------------------------------------------- CUDA cards (device properties patched)

# Kaggle's cards and the ones a researcher meets elsewhere: (name as torch reports it, compute capability, GiB).
CARDS = {
    "P100": ("Tesla P100-PCIE-16GB", 6, 0, 16),
    "V100": ("Tesla V100-SXM2-16GB", 7, 0, 16),
    "T4": ("Tesla T4", 7, 5, 15),
    "A10": ("NVIDIA A10", 8, 6, 22),
    "L4": ("NVIDIA L4", 8, 9, 22),
    "A100": ("NVIDIA A100-SXM4-40GB", 8, 0, 40),
    "H100": ("NVIDIA H100 80GB HBM3", 9, 0, 79),
}
NATIVE_BF16 = {"A10", "L4", "A100", "H100"}


def cuda_card(monkeypatch, card):
    """One CUDA card as torch's own code reads it: available, one device, current device 0, its properties. Below
    torch.cuda.get_device_properties / get_device_capability / current_device / is_bf16_supported, which stay
    torch's. A bf16 tensor can be created on every CUDA card (what is_bf16_supported's emulation answer checks)."""
    name, major, minor, gib = CARDS[card]
    props = SimpleNamespace(name=name, major=major, minor=minor, total_memory=gib * 2**30)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: None)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_get_device_properties", lambda index: props, raising=False)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    return name, f"{major}.{minor}"


@pytest.mark.parametrize("card", list(CARDS))
def test_auto_amp_on_cuda_is_bf16_only_where_the_card_has_bf16_units(monkeypatch, card):
    name, capability = cuda_card(monkeypatch, card)
    cuda = torch.device("cuda")
    assert torch.cuda.get_device_capability(cuda) == tuple(CARDS[card][1:3])  # torch reads the patched card
    assert torch.cuda.is_bf16_supported()  # what the emulation answer says on every card: the old defect
    assert runtime.cuda_has_native_bf16(cuda) is torch.cuda.is_bf16_supported(including_emulation=False)
    text, warning = runtime.describe_amp("auto", cuda)
    assert warning is None
    if card in NATIVE_BF16:
        assert runtime.resolve_amp("auto", cuda) == (torch.bfloat16, False)
        assert text == f"amp bf16 ({name}, compute capability {capability}: native bf16)"
    else:
        assert runtime.resolve_amp("auto", cuda) == (torch.float16, True)
        assert text == (f"amp fp16 ({name}, compute capability {capability}: no bf16 units, fp16 tensor cores; "
                        f"GradScaler on)")
    assert runtime.resolve_amp("fp16", cuda) == (torch.float16, True)
    assert runtime.resolve_amp("off", cuda) == (None, False)


@pytest.mark.parametrize("card", list(CARDS))
def test_forced_bf16_on_a_card_without_bf16_units_warns_once(monkeypatch, card):
    name, capability = cuda_card(monkeypatch, card)
    cuda = torch.device("cuda")
    assert runtime.resolve_amp("bf16", cuda) == (torch.bfloat16, False)  # forced: the user's choice stands
    text, warning = runtime.describe_amp("bf16", cuda)
    assert text == "amp bf16 (--amp bf16)"
    if card in NATIVE_BF16:
        assert warning is None
    else:
        assert warning == (f"warning: --amp bf16 on {name} (compute capability {capability}, no bf16 units: torch "
                           f"emulates it): slow; --amp auto picks fp16 with a GradScaler")
    assert runtime.describe_amp("fp16", cuda) == ("amp fp16 (--amp fp16)", None)
