"""`pip install .` gives a working package: installed away from the source tree, it imports every subpackage
(the optimizer, the HF Trainer glue, run_glue.py's helpers) from the installed copy, finds its kernel sources,
builds them and steps on the CPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STEP = r"""
import sys, torch, mfac_optim
from mfac_optim import MFAC
from mfac_optim.kernels import SOURCES, cpu_passes
assert mfac_optim.__file__.startswith(sys.argv[1]), mfac_optim.__file__
assert (SOURCES / "cpu_passes.cpp").is_file() and str(SOURCES).startswith(sys.argv[1])
import mfac_optim.hf.trainer, mfac_glue.command_line, mfac_glue.records
for module in (mfac_optim.hf.trainer, mfac_glue.command_line, mfac_glue.records):
    assert module.__file__.startswith(sys.argv[1]), module.__file__
assert cpu_passes() is not None
torch.manual_seed(0)
p = torch.nn.Parameter(torch.randn(64, 32))
optimizer = MFAC([p], lr=1.0, num_grads=4, damp=1e-3)
p.grad = torch.randn(64, 32)
g = p.grad.double().reshape(-1)
before = p.detach().double().reshape(-1).clone()
optimizer.step()
# One stored gradient: F = λI + ggᵀ/m, so F⁻¹g = g / (λ + |g|²/m).
expected = before - g / (1e-3 + g.dot(g) / 4)
assert torch.allclose(p.detach().double().reshape(-1), expected, rtol=1e-5, atol=1e-7), "wrong step"
print("installed package OK")
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    # The build backend (setuptools) is the venv's own: no download, as on a machine without the network.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(ROOT)], check=True, capture_output=True, text=True, timeout=600)
    return target


@pytest.mark.slow
def test_installed_package_imports_builds_its_kernels_and_steps(installed, tmp_path):
    # Its kernels are built in a folder of its own: a copy installed under a temporary path would otherwise leave a
    # build in the user's torch cache at every run.
    result = subprocess.run([sys.executable, "-c", STEP, str(installed)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(installed),
                                                         "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "installed package OK" in result.stdout


def test_public_surface_is_what_a_user_needs_and_hf_names_load_lazily():
    code = ("import sys, mfac_optim; assert 'transformers' not in sys.modules, 'the optimizer alone imported transformers'; "
            "print(sorted(mfac_optim.__all__)); from mfac_optim import MFACTrainer, MFACTrainingArguments, MFACArguments; "
            "print(MFACTrainer.__module__, MFACArguments.parse.__qualname__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    names, modules = result.stdout.splitlines()
    assert names == str(["MFAC", "MFACArgumentError", "MFACArguments", "MFACLoadPlanner", "MFACTrainer",
                         "MFACTrainingArguments", "memory_bound_bytes"])
    assert modules == "mfac_optim.hf.trainer MFACArguments.parse"


def test_the_tools_that_read_run_folders_or_pass_configs_on_start_without_transformers():
    # compare and controls are run over and over on kept records, and sweep only starts run_glue.py processes;
    # transformers' import is most of their start-up. compare reads the study's kept STS-B records here, training
    # clocks included.
    code = """
import contextlib, io, sys
from pathlib import Path
import mfac_glue.experiments.controls, mfac_glue.experiments.sweep
from mfac_optim import MFACArgumentError
from mfac_glue.experiments import compare
runs = [str(path) for path in sorted(Path(sys.argv[1]).glob("seeds/*/seed*"))]
with contextlib.redirect_stdout(io.StringIO()) as table:
    compare.main(runs + ["--bootstrap", "0", "--max_load", "2.5"])
assert "train s" in table.getvalue() and "416" in table.getvalue(), table.getvalue()
print(sorted(name for name in ("transformers", "datasets") if name in sys.modules))
"""
    records = ROOT / "docs" / "results" / "full_budget" / "stsb"
    result = subprocess.run([sys.executable, "-c", code, str(records)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"

    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from mfac_glue.records import CHECKPOINTS, TRAINER_STATE
    assert TRAINER_STATE == TRAINER_STATE_NAME
    assert CHECKPOINTS == f"{PREFIX_CHECKPOINT_DIR}-*"


def test_optimizer_arguments_after_params_are_keyword_only():
    import inspect

    from mfac_optim import MFAC

    parameters = list(inspect.signature(MFAC.__init__).parameters.values())[2:]
    assert parameters and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)


@pytest.mark.slow
def test_console_scripts_and_run_glue_work_from_the_installed_copy(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    tools = ("mfac-tune", "mfac-sweep", "mfac-compare", "mfac-controls")
    # Started together, so that on several cores they import side by side.
    running = {tool: subprocess.Popen([str(installed / "bin" / tool), "--help"], cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env) for tool in tools}
    for tool, process in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0 and out.startswith(f"usage: {tool}"), err[-2000:]
    where = subprocess.run([sys.executable, "-c", "import run_glue, mfac_glue.experiments.tune as tune; "
                            "print(run_glue.__file__); print(tune.__file__)"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300, env=env)
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(Path(path).is_relative_to(installed) for path in where.stdout.split())
