"""MFAC with shard=True over 2 CPU processes (gloo): the same steps as one unsharded optimizer, half the window
per process, per-process resume, and run_glue.py under torchrun."""
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import run_glue
from mfac_optim import MFAC
from mfac_optim.distributed import parse_shard_entry_name

ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
STEPS = 50  # six wrap-arounds of the embedding model's 8 slots, with the loss scaled by 0.1, 1 or 10 (100×)
VOCABULARY, WIDTH, HIDDEN, CLASSES = 400, 4, 6, 3

def embedding_model(shard: bool) -> tuple[list[torch.Tensor], MFAC]:
    """A word embedding (row-sparse in the window), a hidden layer and a head; two param groups with their own
    lr, momentum and weight decay (decay only on the dense matrices, so the embedding stays row-sparse)."""
    generator = torch.Generator().manual_seed(0)
    embedding, hidden_weight, head_weight = (torch.randn(*shape, generator=generator).requires_grad_()
                                             for shape in ((VOCABULARY, WIDTH), (HIDDEN, WIDTH), (CLASSES, HIDDEN)))
    hidden_bias, head_bias = torch.zeros(HIDDEN, requires_grad=True), torch.zeros(CLASSES, requires_grad=True)
    groups = [{"params": [hidden_weight, head_weight], "weight_decay": 0.01, "momentum": 0.9},
              {"params": [embedding, hidden_bias, head_bias], "lr": 3e-3, "momentum": 0.5}]
    optimizer = MFAC(groups, lr=1e-2, num_grads=8, damp=1e-6, shard=shard)
    return [embedding, hidden_weight, head_weight, hidden_bias, head_bias], optimizer


def train_step(params: list[torch.Tensor], optimizer: MFAC, step: int) -> None:
    """One step on batch `step`, the same batch in every process (as DDP's averaged gradient is)."""
    embedding, hidden_weight, head_weight, hidden_bias, head_bias = params
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(VOCABULARY, (8, 3), generator=generator)
    labels = torch.randint(CLASSES, (8,), generator=generator)
    features = torch.tanh(embedding[tokens].mean(dim=1) @ hidden_weight.T + hidden_bias)
    loss = 10.0 ** (step % 3 - 1) * torch.nn.functional.cross_entropy(features @ head_weight.T + head_bias, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def dense_model(shard: bool) -> tuple[list[torch.Tensor], MFAC]:
    """Two dense layers (30×40 + 30, 5×30 + 5 parameters), no momentum: the state is the window and the Gram."""
    shapes = ((30, 40), (30,), (5, 30), (5,))
    params = [torch.randn(*shape, generator=torch.Generator().manual_seed(1)).requires_grad_() for shape in shapes]
    return params, MFAC(params, num_grads=16, damp=1e-3, shard=shard)


WINDOW_RUN_STEPS = 26  # six wrap-arounds of 4 slots


def window_run(shard: bool, density: float) -> dict:
    """The dense model in float64 (so that the parameters' change is the direction to every digit) with a bf16
    window, dense or compressed (density 0.01: 328 of each process's ~700 coordinates), λ = 1e-6, gradient norms
    varying 100×: the directions and the stored rows after each step, and the count of factorisations."""
    params = [torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).requires_grad_()
              for shape in ((30, 40), (30,), (5, 30), (5,))]
    optimizer = MFAC(params, lr=1.0, num_grads=4, damp=1e-6, density=density, grad_dtype="bfloat16", shard=shard)
    directions, stored = [], []
    for step in range(WINDOW_RUN_STEPS):
        generator = torch.Generator().manual_seed(2000 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64) * 10.0 ** (step % 3 - 1)
        before = torch.cat([p.detach().reshape(-1) for p in params])
        optimizer.step()
        directions.append(before - torch.cat([p.detach().reshape(-1) for p in params]))
        stored.append(optimizer.stored_gradients())
    return {"directions": directions, "stored": stored,
            "refactorizations": int(optimizer.state[params[0]]["refactorizations"])}


def own_names(entries: dict) -> dict:
    """A process's state entries under their own names (a sharded window's are named with their shard)."""
    return {parse_shard_entry_name(name)[0]: value for name, value in entries.items()}


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        params, optimizer = embedding_model(shard=True)
        for step in range(STEPS // 2):
            train_step(params, optimizer, step)
        halfway, saved = snapshot(params), io.BytesIO()
        torch.save(optimizer.state_dict(), saved)
        for step in range(STEPS // 2, STEPS):
            train_step(params, optimizer, step)

        resumed_params, resumed = embedding_model(shard=True)
        with torch.no_grad():
            for p, value in zip(resumed_params, halfway):
                p.copy_(value)
        resumed.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
        for step in range(STEPS // 2, STEPS):
            train_step(resumed_params, resumed, step)

        dense_params, dense = dense_model(shard=True)
        for p in dense_params:
            p.grad = torch.ones_like(p)
        dense.step()
        torch.save({"params": snapshot(params), "resumed": snapshot(resumed_params), "state": optimizer.state_dict(),
                    "memory": optimizer.memory_bytes(), "dense_memory": dense.memory_bytes(),
                    "compressed": window_run(shard=True, density=0.01),
                    "dense_window": window_run(shard=True, density=1.0)},
                   Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 2 processes ended with (one spawn serves all tests here)."""
    folder = tmp_path_factory.mktemp("ranks")
    mp.spawn(worker, args=(str(folder / "init"), str(folder)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def unsharded_run() -> tuple[list[torch.Tensor], MFAC]:
    params, optimizer = embedding_model(shard=False)
    for step in range(STEPS):
        train_step(params, optimizer, step)
    return params, optimizer


@pytest.mark.distributed
@pytest.mark.slow
def test_sharded_steps_equal_the_unsharded_optimizer(ranks):
    # fp32 partial dot products summed in another order differ by ~1e-7; 50 steps of training at λ = 1e-6 carry
    # that into the trajectory (the per-step exactness is test_each_process_stores_its_own_shard_and_the_step_is_exact).
    expected, _ = unsharded_run()
    for result in ranks:
        for got, want in zip(result["params"], expected):
            assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))


@pytest.mark.distributed
@pytest.mark.slow
def test_each_process_keeps_its_half_of_the_window(ranks):
    # Dense model, rank r keeps rows [30r/2, 30(r+1)/2) of the 30-row tensors and [5r/2, 5(r+1)/2) of the 5-row
    # ones: 15·40 + 15 + 2·30 + 2 = 677 and 15·40 + 15 + 3·30 + 3 = 708 of the 1,385 columns, in fp32, over 16
    # slots; each also holds the 16 × 16 float64 Gram matrix and its factor, five int64 counters and the factor's λ.
    _, whole = dense_model(shard=False)
    for p in whole.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    whole.step()
    replicated = 2 * 16 * 16 * 8 + 6 * 8
    assert whole.memory_bytes() == 16 * 1385 * 4 + replicated
    assert [result["dense_memory"] for result in ranks] == [16 * 677 * 4 + replicated, 16 * 708 * 4 + replicated]
    # The embedding model (with momentum): each process keeps the rows its half of the vocabulary has seen, half
    # the other rows and half the momentum; only the 8 × 8 Gram matrix, its factor and the counters are whole
    # everywhere.
    _, unsharded = unsharded_run()
    replicated = 2 * 8 * 8 * 8 + 6 * 8
    halves = [result["memory"] - replicated for result in ranks]
    assert sum(halves) == pytest.approx(unsharded.memory_bytes() - replicated, rel=0.1)
    assert all(0.4 < half / (unsharded.memory_bytes() - replicated) < 0.6 for half in halves)
    state = {index: own_names(entries) for index, entries in ranks[1]["state"]["state"].items()}
    # the embedding is the third parameter in group order
    assert state[2]["row_values"].shape[2] == WIDTH and int(state[0]["shard_world_size"]) == 2


@pytest.mark.distributed
@pytest.mark.slow
def test_sharded_resume_is_identical(ranks):
    for result in ranks:
        assert all(torch.equal(a, b) for a, b in zip(result["params"], result["resumed"]))


@pytest.mark.distributed
@pytest.mark.slow
def test_state_of_another_world_size_is_refused(ranks):
    _, optimizer = embedding_model(shard=True)  # no process group here: one unsharded process
    with pytest.raises(ValueError, match="holds window shards of 2 processes, and this process keeps shard 0 of 1: "
                                         "resume on 2 processes, each loading its own shard"):
        optimizer.load_state_dict(ranks[1]["state"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_glue_args(tiny_bert: Path, glue_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(tiny_bert), "--task_name", "sst2", "--do_train", "--do_eval",
            "--train_file", str(glue_dir / "SST-2" / "train.tsv"), "--validation_file", str(glue_dir / "SST-2" / "dev.tsv"),
            "--max_train_samples", "64", "--max_eval_samples", "48", "--max_seq_length", "32",
            "--per_device_train_batch_size", "8", "--max_steps", "4", "--learning_rate", "1e-3", "--seed", "3",
            "--optim", "MFAC", "--optim_args", '{"num_grads": 4, "damp": 1e-4, "momentum": 0.5, "shard": true}',
            "--output_dir", str(output_dir), "--report_to", "none", "--use_cpu", *extra]


def torchrun(args: list[str]) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "run_glue.py"), *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.slow
def test_run_glue_under_torchrun_saves_per_process_state_and_resumes(tmp_path, tiny_bert, glue_dir, capsys):
    straight = tmp_path / "straight"
    torchrun(run_glue_args(tiny_bert, glue_dir, straight, "--save_strategy", "steps", "--save_steps", "2"))
    checkpoint = straight / "checkpoint-2"
    assert not (checkpoint / "optimizer.pt").exists()
    states = [torch.load(checkpoint / f"rank{rank}-of-2-optimizer.pt", weights_only=True) for rank in range(2)]
    for rank, state in enumerate(states):  # each process's entries are named with its shard
        assert all(name.endswith(f"@shard{rank}of2") for entries in state["state"].values() for name in entries)
        state["state"] = {index: own_names(entries) for index, entries in state["state"].items()}
    windows = [next(iter(state["state"].values())) for state in states]
    assert [int(window["shard_rank"]) for window in windows] == [0, 1]
    assert all(int(window["step"]) == 2 for window in windows)
    # Each process keeps its rows of every parameter: the word embedding's row-sparse, the rest in its window.
    model_size = sum(tensor.numel() for tensor in load_file(straight / "model.safetensors").values())
    assert all(window["window"].shape[1] < model_size / 2 for window in windows)
    assert all(any("row_values" in param_state for param_state in state["state"].values()) for state in states)
    # DDP: 4 steps of 2 processes × 8 examples are one epoch of the 64 (one process alone would do half).
    assert json.loads((straight / "trainer_state.json").read_text())["epoch"] == 1.0

    resumed = tmp_path / "resumed"
    torchrun(run_glue_args(tiny_bert, glue_dir, resumed, "--resume_from_checkpoint", str(checkpoint)))
    final_straight, final_resumed = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(final_straight[key], final_resumed[key]) for key in final_straight)

    with pytest.raises(SystemExit) as exit_info:  # one process from a 2-process checkpoint
        run_glue.main(run_glue_args(tiny_bert, glue_dir, tmp_path / "single", "--resume_from_checkpoint", str(checkpoint)))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "sharded over 2 processes, but this run has 1: resume with 2 processes" in error


@pytest.mark.parametrize("saved, shard, message", [
    (["rank0-of-2-optimizer.pt", "rank1-of-2-optimizer.pt"], False,
     "holds M-FAC state sharded over 2 processes; resume with --optim MFAC"),
    (["optimizer.pt"], True, "holds unsharded optimizer state (optimizer.pt); resume it without"),
])
def test_resuming_sharded_state_unsharded_or_back_is_refused(tmp_path, saved, shard, message, capsys):
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    for name in saved:  # whole files, as a finished save leaves them (an incomplete checkpoint is skipped)
        torch.save({}, checkpoint / name)
    (checkpoint / "trainer_state.json").write_text("{}")
    argv = ["--model_name_or_path", "unused", "--task_name", "sst2", "--do_train", "--output_dir", str(tmp_path),
            "--optim", "MFAC", "--optim_args", json.dumps({"num_grads": 4, "shard": shard})]
    with pytest.raises(SystemExit) as exit_info:
        run_glue.main(argv)  # the last checkpoint in output_dir is resumed
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Trainer runs GPU processes as DDP without --use_cpu")
def test_processes_without_use_cpu_on_a_cpu_machine_are_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        run_glue.main(["--model_name_or_path", "unused", "--task_name", "sst2", "--do_train", "--output_dir", "unused"])
    assert exit_info.value.code == 2
    assert "--use_cpu: 2 processes were launched on a machine without a GPU" in capsys.readouterr().err


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("window", ["compressed", "dense_window"])
def test_each_process_stores_its_own_shard_and_the_step_is_exact(ranks, window):
    """Each process keeps (the top entries of) its own columns; together the stored rows C are the union, and every
    process steps along F⁻¹c = m · Cᵀ (mλI + CCᵀ)⁻¹ eᵢ for that C (float64 reference), λ = 1e-6, over six wraps in
    which the m × m factor is made once and then only updated."""
    worst = 0.0
    for step in range(WINDOW_RUN_STEPS):
        shards = [result[window]["stored"][step].double() for result in ranks]
        assert not torch.any((shards[0] != 0) & (shards[1] != 0))  # disjoint columns
        stored = shards[0] + shards[1]
        kernel = 4e-6 * torch.eye(4, dtype=torch.float64) + stored @ stored.T
        expected = 4 * stored.T @ torch.linalg.solve(kernel, torch.eye(4, dtype=torch.float64)[step % 4])
        got = ranks[0][window]["directions"][step]
        assert torch.equal(got, ranks[1][window]["directions"][step])
        worst = max(worst, ((got - expected).norm() / expected.norm()).item())
    assert worst < 1e-4, worst
    assert [result[window]["refactorizations"] for result in ranks] == [1, 1]
    if window == "compressed":  # each process kept 328 entries of its ~700 columns per step: fewer than all
        assert 0 < (ranks[0]["compressed"]["stored"][-1][0] != 0).sum() <= 328
