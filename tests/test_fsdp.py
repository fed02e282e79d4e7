"""MFAC on FSDP2 parameters (fully_shard, DTensors sharded on dim 0) over 2 and 4 CPU processes with gloo: each
process keeps the window of its own shards, the dot products are summed with one all-reduce, and each process
updates its shards alone. The weights after 20 steps on a tiny BERT equal one process's; the window per process
is about 1/N of it; HSDP (2 × 2: replicated across pairs, sharded within each) takes the same steps; a compressed
window on the shards steps along the exact M-FAC direction over the stored rows of all processes; DCP
(get_state_dict, dcp.save, dcp.load with MFACLoadPlanner, set_state_dict) resumes bit for bit, and a checkpoint of
2 processes' shards is refused by 4 with one line."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mfac_optim import MFAC

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

VOCABULARY, STEPS = 120, 20
DENSE = {"lr": 1e-3, "num_grads": 8, "damp": 1e-4}
# float64 parameters, so that a parameter's change divided by lr (a power of two) is the direction to every digit.
COMPRESSED = {"lr": 2.0 ** -10, "num_grads": 4, "damp": 1e-4, "density": 0.25}
COMPRESSED_STEPS = 10


def tiny_bert(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCABULARY, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(config).to(dtype)


def train_step(model: torch.nn.Module, optimizer: MFAC, step: int) -> None:
    """Batch `step`, the same in every process: FSDP2's averaged gradient is then the one process's."""
    generator = torch.Generator().manual_seed(100 + step)
    tokens, labels = torch.randint(1, VOCABULARY, (8, 12), generator=generator), torch.randint(2, (8,), generator=generator)
    optimizer.zero_grad()
    model(input_ids=tokens, labels=labels).loss.backward()
    optimizer.step()


def sharded_bert(mesh, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = tiny_bert(dtype)
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def dense_run(mesh) -> dict:
    model = sharded_bert(mesh)
    optimizer = MFAC(model.parameters(), **DENSE)
    for step in range(STEPS):
        train_step(model, optimizer, step)
    return {"weights": {name: p.full_tensor() for name, p in model.named_parameters()},
            "window_bytes": optimizer.window_bytes()}


def compressed_run(mesh) -> dict:
    """Each step's local direction and stored rows, from this process's shards."""
    model = sharded_bert(mesh, torch.float64)
    optimizer = MFAC(model.parameters(), **COMPRESSED)
    directions, stored = [], []
    for step in range(COMPRESSED_STEPS):
        before = torch.cat([p.to_local().detach().reshape(-1) for p in model.parameters()])
        train_step(model, optimizer, step)
        after = torch.cat([p.to_local().detach().reshape(-1) for p in model.parameters()])
        directions.append((before - after) / COMPRESSED["lr"])
        stored.append(optimizer.stored_gradients().double())
    return {"directions": directions, "stored": stored}


def checkpointed_run(mesh, checkpoint: str) -> dict:
    """Six steps, a DCP checkpoint, six more; then a fresh model and optimizer resumed from the checkpoint for the
    same six: the full weights of both."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = sharded_bert(mesh)
    optimizer = MFAC(model.parameters(), **DENSE)
    for step in range(6):
        train_step(model, optimizer, step)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=checkpoint)
    for step in range(6, 12):
        train_step(model, optimizer, step)
    resumed_model = sharded_bert(mesh)
    resumed = MFAC(resumed_model.parameters(), **DENSE)
    load_from(checkpoint, resumed_model, resumed)
    for step in range(6, 12):
        train_step(resumed_model, resumed, step)
    return {"weights": {name: p.full_tensor() for name, p in model.named_parameters()},
            "resumed": {name: p.full_tensor() for name, p in resumed_model.named_parameters()}}


def load_from(checkpoint: str, model: torch.nn.Module, optimizer: MFAC) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from mfac_optim import MFACLoadPlanner

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optimizer_state}
    dcp.load(state, checkpoint_id=checkpoint, planner=MFACLoadPlanner(optimizer))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def other_world_refusal(mesh, checkpoint: str) -> str:
    from torch.distributed.checkpoint import CheckpointException

    model = sharded_bert(mesh)
    try:
        load_from(checkpoint, model, MFAC(model.parameters(), **DENSE))
    except CheckpointException as error:  # DCP gathers each process's error into one
        return str(error)
    return "loaded"


def worker(rank: int, world_size: int, init_file: str, out_dir: str, meshes: list[tuple[int, ...]],
           checkpoint: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)  # several processes on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = {}
        for shape in meshes:
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard")[-len(shape):])
            results[shape] = dense_run(mesh)
            if shape == (2,):
                results["compressed"] = compressed_run(mesh)
                results["checkpointed"] = checkpointed_run(mesh, checkpoint)
            if shape == (4,):
                results["other world"] = other_world_refusal(mesh, checkpoint)
        torch.save(results, Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(folder: Path, world_size: int, meshes: list[tuple[int, ...]], checkpoint: Path) -> list[dict]:
    folder.mkdir()
    mp.spawn(worker, args=(world_size, str(folder / "init"), str(folder), meshes, str(checkpoint)),
             nprocs=world_size, join=True)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Each run's results, one per process (two spawns: 2 processes, then 4 for both 4-process meshes)."""
    root = tmp_path_factory.mktemp("fsdp")
    checkpoint = root / "checkpoint"
    two, four = spawn(root / "two", 2, [(2,)], checkpoint), spawn(root / "four", 4, [(4,), (2, 2)], checkpoint)
    return {run: [process[run] for process in processes]
            for processes, names in ((two, [(2,), "compressed", "checkpointed"]), (four, [(4,), (2, 2), "other world"]))
            for run in names}


@pytest.fixture(scope="module")
def one_process() -> dict:
    model = tiny_bert()
    optimizer = MFAC(model.parameters(), **DENSE)
    for step in range(STEPS):
        train_step(model, optimizer, step)
    assert any("row_values" in state for state in optimizer.state.values())  # the word embedding is row-sparse
    return {"weights": {name: p.detach() for name, p in model.named_parameters()},
            "window_bytes": optimizer.window_bytes()}


def relative_difference(weights: dict, expected: dict) -> float:
    """‖W − W₁‖ / ‖W₁‖ over all weights (a per-tensor ratio is meaningless for the attention key biases, whose
    gradient is zero up to rounding: their weights stay ~1e-13)."""
    difference = sum(((weights[name] - value) ** 2).sum() for name, value in expected.items())
    return (difference / sum((value ** 2).sum() for value in expected.values())).sqrt().item()


@pytest.mark.parametrize("mesh", [(2,), (4,), (2, 2)], ids=["fsdp2", "fsdp4", "hsdp2x2"])
def test_sharded_weights_equal_one_process_and_each_keeps_its_share_of_the_window(runs, one_process, mesh):
    processes = runs[mesh]
    for result in processes:
        assert relative_difference(result["weights"], one_process["weights"]) < 1e-6
    shards = mesh[-1]
    for result in processes:  # each process's window covers its 1/N of every parameter's rows
        share = result["window_bytes"] / one_process["window_bytes"]
        assert 0.7 / shards < share < 1.3 / shards, share
    if mesh == (2, 2):  # replicas hold the same shards, so the same windows
        assert [result["window_bytes"] for result in processes[:2]] == [result["window_bytes"] for result in processes[2:]]


def test_a_compressed_window_on_the_shards_steps_along_the_exact_direction(runs):
    """Each process compresses its own shards; together the stored rows C are the union (columns in rank order),
    and each process's change is its part of F⁻¹c = m · Cᵀ (mλI + CCᵀ)⁻¹ eᵢ (float64 reference)."""
    processes, m, damp = runs["compressed"], COMPRESSED["num_grads"], COMPRESSED["damp"]
    worst = 0.0
    for step in range(COMPRESSED_STEPS):
        stored = torch.cat([result["stored"][step] for result in processes], dim=1)
        kernel = m * damp * torch.eye(m, dtype=torch.float64) + stored @ stored.T
        expected = m * stored.T @ torch.linalg.solve(kernel, torch.eye(m, dtype=torch.float64)[step % m])
        got = torch.cat([result["directions"][step] for result in processes])
        worst = max(worst, ((got - expected).norm() / expected.norm()).item())
    assert worst < 1e-9, worst
    kept = (processes[0]["stored"][-1][0] != 0).sum().item()
    assert 0 < kept < processes[0]["stored"][-1].shape[1]  # a compressed row: fewer entries than the shard's


def test_dcp_resumes_the_sharded_optimizer_bit_for_bit_and_another_world_size_is_refused(runs):
    for result in runs["checkpointed"]:
        assert result["weights"].keys() == result["resumed"].keys()
        assert all(torch.equal(result["weights"][name], result["resumed"][name]) for name in result["weights"])
    for message in runs["other world"]:
        assert "MFAC: the optimizer state holds window shards of 2 processes, and this process keeps shard" in message
        assert "of 4: resume on 2 processes, each loading its own shard" in message
