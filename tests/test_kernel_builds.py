"""The CPU kernels are built for a fixed instruction set, chosen from the CPU's features, never for the building
machine (-march=native): a build cache shared between CPUs must never serve a binary a CPU cannot run. A process
that dies during a build (or during the brief build check of every load) must never block the next one."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mfac_optim import kernels
from mfac_optim.storage import DenseRows, PartPlan

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


@pytest.mark.slow
def test_a_cpu_without_avx2_builds_and_loads_its_own_portable_module(cpu, monkeypatch, tmp_path):
    real_machine = kernels.platform.machine()
    if real_machine.lower() not in ("x86_64", "amd64"):
        pytest.skip("simulates an older x86-64 CPU")
    native = kernels.cpu_passes()
    assert native is not None and native.name == kernels.module_name(kernels.instruction_set())
    # Built in a folder of its own: never beside a portable build that another process on the machine may load.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    cpu(real_machine, OLDER_X86)
    monkeypatch.setattr(kernels, "_cpu_passes", None)  # as in a fresh process on the older CPU
    portable = kernels.cpu_passes()
    assert portable is not None and portable.name == kernels.module_name("portable") and portable is not native
    # Its passes (scalar code: no AVX2 is compiled in) against float64.
    generator = torch.Generator().manual_seed(0)
    window = torch.randn(5, 3000, generator=generator)
    rows = DenseRows({"window": window}, PartPlan(DenseRows, 5, 3000, torch.float32, torch.float32), portable)
    exact = window.double()
    torch.testing.assert_close(rows.dots(1, 5), exact @ exact[1], rtol=1e-5, atol=1e-4)
    coefficients = torch.randn(5, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(rows.combine(coefficients).double(), exact.T @ coefficients.float().double(),
                               rtol=1e-5, atol=1e-5)


# A child that takes the build folder as cpu_passes does and marks a build in progress as torch's builder does.
HOLD_THE_BUILD = r"""
import os, sys, time
from mfac_optim.kernels import exclusive_build
with exclusive_build(sys.argv[1]):
    open(os.path.join(sys.argv[1], "lock"), "w").close()
    print("building", flush=True)
    time.sleep(600)
"""

# A child that loads the kernels as the optimizer does, on a machine whose last build was cut short.
LOAD_THE_KERNELS = r"""
from mfac_optim.kernels import cpu_passes, passes_for
assert cpu_passes() is not None, "no kernels"
print("loaded")
"""


def same_package() -> dict[str, str]:
    """The environment for a child that imports the package this test imported (kernels loaded from another
    copy's sources would be rebuilt), with the test's own TORCH_EXTENSIONS_DIR if it set one."""
    return {**os.environ, "PYTHONPATH": str(Path(kernels.__file__).parents[2])}


def own_build_folder(tmp_path: Path, monkeypatch) -> str:
    """The kernels' build folder moved under `tmp_path` (TORCH_EXTENSIONS_DIR) for this test and its children,
    holding a copy of the built kernels with their times, so nothing is rebuilt: a training job on the same
    machine that loads the kernels meanwhile never sees this test's locks, nor removes them."""
    from torch.utils.cpp_extension import _get_build_directory

    name = kernels.module_name(kernels.instruction_set())
    assert kernels.cpu_passes() is not None  # built (or found) in the shared folder
    shared = _get_build_directory(name, False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    own = _get_build_directory(name, False)
    shutil.copytree(shared, own, ignore=shutil.ignore_patterns("lock", "mfac_build.flock"), dirs_exist_ok=True)
    return own


def start_holding_the_build(build_directory: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_BUILD, build_directory], stdout=subprocess.PIPE,
                              text=True, env=same_package())
    line = holder.stdout.readline()
    if line != "building\n":  # a holder that never started must not keep the build folder for its 600 s
        holder.kill()
        holder.wait()
        pytest.fail(f"the child holding the build printed {line!r}")
    return holder


def test_a_build_cut_short_by_a_killed_process_does_not_block_the_next_load(tmp_path, monkeypatch):
    build_directory = own_build_folder(tmp_path, monkeypatch)
    holder = start_holding_the_build(build_directory)
    holder.send_signal(signal.SIGKILL)  # what a session's end or a timeout does: no cleanup runs
    holder.wait(timeout=60)
    assert Path(build_directory, "lock").exists()  # torch's builder alone would wait for it without end
    loaded = subprocess.run([sys.executable, "-c", LOAD_THE_KERNELS], capture_output=True, text=True, timeout=300,
                            env=same_package())
    assert loaded.returncode == 0 and loaded.stdout == "loaded\n", loaded.stderr[-3000:]
    assert "left by a kernel build whose process died" in loaded.stderr
    assert "compiling" not in loaded.stderr  # the copied build was loaded, not made again
    assert not Path(build_directory, "lock").exists()


def test_a_build_in_progress_is_waited_for_and_its_lock_left_alone(tmp_path):
    holder = start_holding_the_build(str(tmp_path))
    waiter = subprocess.Popen([sys.executable, "-W", "error:MFAC", "-c",
                               "import sys; from mfac_optim.kernels import exclusive_build\n"
                               "with exclusive_build(sys.argv[1]): print('my turn')", str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=same_package())
    try:
        time.sleep(3)
        assert waiter.poll() is None and (tmp_path / "lock").exists()
        os.remove(tmp_path / "lock")  # the build finishes: torch's builder removes its lock, then its holder exits
        holder.terminate()
        out, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0 and out == "my turn\n", err  # -W error:MFAC: no warning of a removed lock
    finally:
        for child in (holder, waiter):
            child.kill()
            child.wait()


def test_the_first_build_says_so_in_the_log_and_a_cached_one_does_not(tmp_path, monkeypatch, caplog):
    import torch.utils.cpp_extension as extension

    loads = []
    monkeypatch.setattr(extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    monkeypatch.setattr(extension, "load", lambda **kwargs: loads.append(kwargs["name"]))
    monkeypatch.setattr(kernels, "_cpu_passes", None)  # as in a fresh process
    name = kernels.module_name(kernels.instruction_set())
    with caplog.at_level("WARNING", logger="mfac_optim.kernels"):
        assert kernels.cpu_passes().name == name and loads == [name]
    assert "compiling the fused CPU kernels, once for this machine" in caplog.text and str(tmp_path) in caplog.text
    caplog.clear()
    (tmp_path / f"{name}.so").touch()  # what a finished build leaves
    monkeypatch.setattr(kernels, "_cpu_passes", None)
    with caplog.at_level("WARNING", logger="mfac_optim.kernels"):
        assert kernels.cpu_passes().name == name and loads == [name, name]
    assert "compiling" not in caplog.text


def test_each_copy_of_the_sources_builds_a_module_of_its_own(monkeypatch):
    own = kernels.module_name("x86_64_v3")
    assert own.startswith("mfac_cpu_kernels_x86_64_v3_") and own == kernels.module_name("x86_64_v3")
    monkeypatch.setattr(kernels, "SOURCES", Path("/elsewhere/mfac_optim/kernels"))
    assert kernels.module_name("x86_64_v3") != own  # another checkout: another build folder, no rebuilds in turn
