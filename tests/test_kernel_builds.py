"""The CPU kernels are built for a fixed instruction set, chosen from the CPU's features, never for the building
machine (-march=native): a build cache shared between CPUs must never serve a binary a CPU cannot run."""
import pytest
import torch

from mfac_optim import kernels
from mfac_optim.storage import DenseRows

X86_64_V3 = kernels.X86_64_V3_FLAGS | {"sse2", "sse4_2", "popcnt"}
OLDER_X86 = frozenset({"sse2", "sse4_2", "popcnt", "avx"})  # e.g. a Sandy Bridge compute node: AVX without AVX2


@pytest.fixture
def cpu(monkeypatch):
    """Pretends to be another CPU: its machine name and /proc/cpuinfo flags."""
    def pretend(machine: str, flags):
        monkeypatch.setattr(kernels.platform, "machine", lambda: machine)
        monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    return pretend


def test_each_cpu_gets_the_instruction_set_it_runs(cpu):
    cpu("x86_64", X86_64_V3)
    assert kernels.instruction_set() == "x86_64_v3"
    assert kernels.architecture_flags("x86_64_v3") == ["-march=x86-64-v3"]
    for missing in ("avx2", "fma", "bmi2", "movbe"):
        cpu("x86_64", X86_64_V3 - {missing})
        assert kernels.instruction_set() == "portable", missing
    cpu("x86_64", OLDER_X86)
    assert kernels.instruction_set() == "portable"
    assert kernels.architecture_flags("portable") == ["-march=x86-64"]  # the baseline every x86-64 CPU runs
    cpu("aarch64", frozenset({"fp", "asimd"}))
    assert kernels.instruction_set() == "portable" and kernels.architecture_flags("portable") == []


def test_a_cpu_without_avx2_builds_and_loads_its_own_portable_module(cpu, monkeypatch):
    real_machine = kernels.platform.machine()
    if real_machine.lower() not in ("x86_64", "amd64"):
        pytest.skip("simulates an older x86-64 CPU")
    native = kernels.cpu_passes()
    assert native is not None and native.__name__ == f"mfac_cpu_kernels_{kernels.instruction_set()}"
    cpu(real_machine, OLDER_X86)
    monkeypatch.setattr(kernels, "_cpu_passes", None)  # as in a fresh process on the older CPU
    portable = kernels.cpu_passes()
    assert portable is not None and portable.__name__ == "mfac_cpu_kernels_portable" and portable is not native
    # Its passes (scalar code: no AVX2 is compiled in) against float64.
    generator = torch.Generator().manual_seed(0)
    window = torch.randn(5, 3000, generator=generator)
    monkeypatch.setattr("mfac_optim.storage.fused_passes_for", lambda *args: portable)
    rows = DenseRows(window, torch.float32)
    assert rows._compiled is portable
    exact = window.double()
    torch.testing.assert_close(rows.dots(1), exact @ exact[1], rtol=1e-5, atol=1e-4)
    coefficients = torch.randn(5, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(rows.combine(coefficients).double(), exact.T @ coefficients.float().double(),
                               rtol=1e-5, atol=1e-5)
