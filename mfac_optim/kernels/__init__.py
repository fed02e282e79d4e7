"""The window passes' kernels. On the CPU: compiled from the C++ sources beside this file on first use (some
seconds, then cached by torch) and found relative to the installed package. On a GPU: the Triton kernels of
triton_passes.py, which cover the dots and the combine of every storage kind. Where neither applies, the torch
passes of torch_passes.py serve instead; `passes_for` picks one of the three for a window.

The CPU build targets a fixed instruction set, never the building machine's own (-march=native): torch caches
builds per user, Python and torch version, not per CPU, so on a cluster with a shared home a build made on a newer
login node would die with an illegal instruction on older compute nodes. An x86-64 CPU with AVX2 and its
companions (x86-64-v3) gets the AVX2 kernels; any other CPU a portable build. Each instruction set is a module of
its own name, so one cache holds both and a CPU only ever loads the one it can run."""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from .torch_passes import TorchPasses

SOURCES = Path(__file__).resolve().parent
CPP_SOURCES = ("cpu_passes.cpp", "factor_update.cpp", "bindings.cpp")  # and kernels.h, which they include
_cpu_passes = None  # the compiled module, False once a build failed

# What -march=x86-64-v3 lets the compiler use beyond x86-64, as Linux's /proc/cpuinfo names them (abm: lzcnt).
X86_64_V3_FLAGS = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})


logger = logging.getLogger(__name__)


def cpu_flags() -> Optional[frozenset[str]]:
    """The CPU's feature flags as Linux reports them, or None where there is no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def instruction_set() -> str:
    """The instruction set the CPU kernels are built for on this CPU: "x86_64_v3" where every feature of that level
    is present, else "portable"."""
    if not is_x86_64():
        return "portable"
    flags = cpu_flags()
    if flags is None:  # no /proc/cpuinfo (macOS, Windows): torch's own dispatch check
        return "x86_64_v3" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "portable"
    return "x86_64_v3" if X86_64_V3_FLAGS <= flags else "portable"


def architecture_flags(target: str) -> list[str]:
    """-march pins what the build may use: x86-64 alone is the baseline every x86-64 CPU runs; other architectures
    get their compiler's default, which targets the architecture's baseline."""
    if target == "x86_64_v3":
        return ["-march=x86-64-v3"]
    return ["-march=x86-64"] if is_x86_64() else []


def module_name(target: str) -> str:
    """The compiled module's name, also its build folder's: per instruction set, and per copy of the sources (a
    hash of their folder). torch rebuilds a module whose sources lie elsewhere than at its last build, so two
    checkouts or installs sharing one build cache would rebuild each other's kernels at every load."""
    copy = hashlib.sha256(str(SOURCES).encode()).hexdigest()[:8]
    return f"mfac_cpu_kernels_{target}_{copy}"


def cpu_passes():
    """The compiled CPU kernels (the fused window passes of cpu_passes.cpp, the factor update of factor_update.cpp)
    for this CPU's instruction set, as torch operators, or None if they cannot be built here."""
    global _cpu_passes
    if _cpu_passes is None:
        try:
            from torch.utils.cpp_extension import _get_build_directory, load

            target = instruction_set()
            name = module_name(target)
            # The folder torch builds in (per Python and torch flavour); private, but stable since torch 1.x.
            build_directory = _get_build_directory(name, False)
            with exclusive_build(build_directory):
                if not os.path.exists(os.path.join(build_directory, f"{name}.so")):
                    logger.warning("MFAC: compiling the fused CPU kernels, once for this machine (about 10 s on "
                                   "2 cores; later runs load them from %s)", build_directory)
                load(name=name, sources=[str(SOURCES / source) for source in CPP_SOURCES],
                     extra_cflags=["-O3", *architecture_flags(target), "-fopenmp"], extra_ldflags=["-fopenmp"],
                     is_python_module=False)
            _cpu_passes = getattr(torch.ops, name)  # bindings.cpp registers the kernels under the module's name
        except Exception as error:  # no compiler, no ninja, unsupported platform (no fcntl: Windows)
            warnings.warn(f"MFAC: fused CPU kernels unavailable ({type(error).__name__}: {error}); using torch passes")
            _cpu_passes = False
    return _cpu_passes or None


@contextmanager
def exclusive_build(build_directory: str) -> Iterator[None]:
    """Holds the build folder for one process at a time, with a lock that dies with its holder.

    torch's builder marks a build in progress with a lock file and waits, without end, for it to go; every load
    takes that file, even when nothing needs building. A process killed while holding it (a job or session that ends,
    a timeout's kill, the out-of-memory killer) leaves the file behind, and every later process would hang.
    The kernel releases a flock when its holder dies, so whoever holds the flock knows that any lock file it finds
    was left by a dead process, and removes it."""
    import fcntl

    torch_lock = os.path.join(build_directory, "lock")
    with open(os.path.join(build_directory, "mfac_build.flock"), "a") as flock_file:
        fcntl.flock(flock_file, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        if os.path.exists(torch_lock):
            warnings.warn(f"MFAC: removing {torch_lock}, left by a kernel build whose process died")
            os.remove(torch_lock)
        yield


def passes_for(device: torch.device, dtype: torch.dtype, accumulate_dtype: torch.dtype) -> object:
    """The backend of a window's passes, picked once when the window is made: the compiled CPU kernels for a CPU
    window of fp32 or bf16 summed in fp32, the Triton kernels for a GPU window of fp32, bf16 or fp16 summed in fp32,
    else (float64 sums, other dtypes, no compiler, no Triton) the torch passes. All three have the same function
    names and signatures (torch_passes.py)."""
    if accumulate_dtype == torch.float32:
        if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
            compiled = cpu_passes()
            if compiled is not None:
                return compiled
        if device.type == "cuda" and dtype in (torch.float32, torch.bfloat16, torch.float16):
            try:
                from . import triton_passes
            except ImportError:  # torch's CUDA wheels bring Triton; other builds may not
                pass
            else:
                return triton_passes
    return TorchPasses(accumulate_dtype)


def buffer_bytes(passes: object) -> int:
    """The scratch a backend keeps between steps: the torch passes' converted block (the compiled and Triton passes
    keep none)."""
    return passes.buffer_bytes() if isinstance(passes, TorchPasses) else 0
