"""The torch.optim contracts that client code relies on, checked for MFAC and for torch's AdamW side by side: what
AdamW does is the behaviour asked of MFAC."""
import copy
import io
import pickle

import pytest
import torch

from mfac_optim import MFAC

OPTIMIZERS = {"MFAC": lambda params, **kwargs: MFAC(params, num_grads=4, damp=1e-3, **kwargs),
              "AdamW": lambda params, **kwargs: torch.optim.AdamW(params, **kwargs)}


class TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.unused = torch.nn.Linear(6, 5), torch.nn.Linear(5, 2), torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, use_second: bool = True) -> torch.Tensor:
        hidden = torch.tanh(self.first(x))
        return self.second(hidden).sum() if use_second else hidden.sum()


def make(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = TwoLayers()
    return model, OPTIMIZERS[name](model.parameters(), lr=1e-2, **kwargs)


def train(model, optimizer, steps: int, seed: int = 1, use_second: bool = True) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 6, generator=generator), use_second).backward()
        optimizer.step()


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("copy_of", [copy.deepcopy, lambda pair: pickle.loads(pickle.dumps(pair)),
                                     lambda pair: torch.load(saved(pair), weights_only=False)],
                         ids=["deepcopy", "pickle", "torch.save"])
def test_a_copy_of_model_and_optimizer_trains_on_as_the_original(name, copy_of):
    model, optimizer = make(name)
    train(model, optimizer, 3)
    model_copy, optimizer_copy = copy_of((model, optimizer))
    train(model, optimizer, 3, seed=2)
    train(model_copy, optimizer_copy, 3, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(model_copy)))


def saved(pair) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(pair, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_hooks_see_the_state_and_may_replace_it(name):
    model, optimizer = make(name)
    train(model, optimizer, 3)
    saved_state = optimizer.state_dict()
    entries = len(saved_state["state"])
    seen = {}
    restored, optimizer_restored = make(name)
    restored.load_state_dict(model.state_dict())

    def pre_hook(optimizer, state_dict):
        seen["pre"] = len(state_dict["state"])
        return copy.deepcopy(state_dict)  # a replacement: what is loaded from here on

    def post_hook(optimizer):
        seen["post"] = len(optimizer.state)

    optimizer_restored.register_load_state_dict_pre_hook(pre_hook)
    optimizer_restored.register_load_state_dict_post_hook(post_hook)
    optimizer_restored.register_state_dict_post_hook(lambda optimizer, state_dict: seen.update(
        saved=len(state_dict["state"])))
    optimizer_restored.load_state_dict(saved_state)
    assert seen == {"pre": entries, "post": entries} and entries > 0
    optimizer_restored.state_dict()
    assert seen["saved"] == entries
    train(model, optimizer, 2, seed=2)
    train(restored, optimizer_restored, 2, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(restored)))

    # A pre-hook's state is the one loaded: one that empties it starts the optimizer afresh.
    fresh, optimizer_fresh = make(name)
    optimizer_fresh.register_load_state_dict_pre_hook(lambda optimizer, state_dict: {**state_dict, "state": {}})
    optimizer_fresh.load_state_dict(saved_state)
    assert len(optimizer_fresh.state) == 0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_parameters_without_a_gradient_are_left_alone_even_with_weight_decay(name):
    model, optimizer = make(name, weight_decay=0.1)
    train(model, optimizer, 3)
    second, unused = weights(model.second), weights(model.unused)
    train(model, optimizer, 2, seed=2, use_second=False)  # `second` has no gradient now, `unused` never had one
    assert all(torch.equal(a, b) for a, b in zip(second, weights(model.second)))
    assert all(torch.equal(a, b) for a, b in zip(unused, weights(model.unused)))
    train(model, optimizer, 1, seed=3)
    assert not all(torch.equal(a, b) for a, b in zip(second, weights(model.second)))  # it trains again


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_step_without_any_gradient_changes_nothing(name):
    model, optimizer = make(name)
    train(model, optimizer, 2)
    before, state = weights(model), copy.deepcopy(optimizer.state_dict())
    optimizer.zero_grad()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    after = optimizer.state_dict()
    for index, entries in state["state"].items():
        assert all(torch.equal(value, after["state"][index][key]) for key, value in entries.items()
                   if torch.is_tensor(value))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_tensor_lr_steps_as_the_same_number(name):
    model, optimizer = make(name)
    tensor_model, tensor_optimizer = make(name)
    for group in tensor_optimizer.param_groups:
        group["lr"] = torch.tensor(group["lr"])
    train(model, optimizer, 3)
    train(tensor_model, tensor_optimizer, 3)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-8) for a, b in zip(weights(model), weights(tensor_model)))
    with pytest.raises(ValueError, match="(?i)tensor lr"):
        OPTIMIZERS[name](TwoLayers().parameters(), lr=torch.tensor([1e-2, 1e-3]))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_an_embedding_alone_trains(name):
    # Textual inversion: only an embedding matrix trains, and a step's gradient touches a few of its rows.
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(50, 8)
    optimizer = OPTIMIZERS[name](embedding.parameters(), lr=1e-2, weight_decay=0.0)
    target = torch.randn(8)
    tokens = torch.tensor([3, 7, 7, 11])
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = ((embedding(tokens) - target) ** 2).sum()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[tokens] = False
    torch.manual_seed(0)
    assert torch.equal(embedding.weight[untouched], torch.nn.Embedding(50, 8).weight[untouched])


@pytest.mark.slow
def test_a_compiled_step_steps_as_the_eager_one():
    # MFAC alone: AdamW's compiled step is torch's own test, and costs 20 s of generated C++ code here.
    model, optimizer = make("MFAC")
    compiled_model, compiled_optimizer = make("MFAC")
    compiled_step = torch.compile(compiled_optimizer.step)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 6, generator=generator)
        for each_model, each_optimizer, step in ((model, optimizer, optimizer.step),
                                                 (compiled_model, compiled_optimizer, compiled_step)):
            each_optimizer.zero_grad()
            each_model(x).backward()
            step()
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(weights(model), weights(compiled_model)))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_param_group_added_after_steps_trains(name):
    # Gradual unfreezing: `second` is frozen at first, then added as a group of its own.
    torch.manual_seed(0)
    model = TwoLayers()
    model.second.requires_grad_(False)
    optimizer = OPTIMIZERS[name](model.first.parameters(), lr=1e-2)
    train(model, optimizer, 3)
    second = weights(model.second)
    model.second.requires_grad_(True)
    optimizer.add_param_group({"params": list(model.second.parameters())})
    train(model, optimizer, 3, seed=2)
    assert not any(torch.equal(a, b) for a, b in zip(second, weights(model.second)))


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_redundancy_takes_adamw_and_points_mfac_to_its_own_sharding(name, one_process_group):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = TwoLayers()
    if name == "AdamW":
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2)
        train(model, optimizer, 2)
        return
    with pytest.raises(ValueError, match=r"ZeroRedundancyOptimizer .* use MFAC\(\.\.\., shard=True\)"):
        ZeroRedundancyOptimizer(model.parameters(), optimizer_class=MFAC, lr=1e-2)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_float64_model_keeps_float64_state_and_steps_past_fp32_precision(name):
    # The same first step in float64 and in float32: the float64 run's state is float64, and its parameters move by
    # amounts that fp32 cannot hold (an fp32 step would leave them on fp32's grid).
    moved = {}
    for dtype in (torch.float64, torch.float32):
        model, optimizer = make(name, **({"grad_dtype": "float64"} if name == "MFAC" and dtype == torch.float64
                                         else {}))
        model.to(dtype)
        start = weights(model)
        optimizer.zero_grad()
        model(torch.randn(8, 6, generator=torch.Generator().manual_seed(1)).to(dtype)).backward()
        optimizer.step()
        moved[dtype] = [after - before for after, before in zip(weights(model), start)]
        if dtype == torch.float64:
            assert all(value.dtype == torch.float64 for state in optimizer.state.values()
                       for key, value in state.items()
                       if torch.is_tensor(value) and value.is_floating_point() and key != "step")  # AdamW's counter
    for wide, narrow in zip(moved[torch.float64][:4], moved[torch.float32][:4]):  # `unused` does not move
        assert not torch.equal(wide, wide.float().double())  # not on fp32's grid
        assert torch.allclose(wide, narrow.double(), rtol=1e-4, atol=1e-6)  # the same step


def test_dcp_round_trips_the_window_bit_for_bit_into_a_fresh_optimizer(tmp_path):
    """get_state_dict, dcp.save, and into a fresh model and optimizer (which have no window yet: DCP's own zero
    step makes none) dcp.load with MFACLoadPlanner and set_state_dict: the resumed run repeats the uninterrupted one
    bit for bit, its row-sparse embedding included (whose saved shapes the fresh template could not know)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from mfac_optim import MFACLoadPlanner
    from test_mfac_optim import make_model_and_optimizer, train_steps

    model, optimizer = make_model_and_optimizer(num_grads=4, damp=1e-4, momentum=0.5)
    train_steps(model, optimizer, 6, seed=1)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=tmp_path)
    train_steps(model, optimizer, 5, seed=2)

    resumed_model, resumed = make_model_and_optimizer(seed=7, num_grads=4, damp=1e-4, momentum=0.5)
    model_state, optimizer_state = get_state_dict(resumed_model, resumed)
    assert not any(resumed.state.values())  # DCP's zero-gradient step allocated no window
    state = {"model": model_state, "optim": optimizer_state}
    dcp.load(state, checkpoint_id=tmp_path, planner=MFACLoadPlanner(resumed))
    set_state_dict(resumed_model, resumed, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert resumed.state[resumed_model.embedding.weight]["row_values"].shape == \
        optimizer.state[model.embedding.weight]["row_values"].shape
    train_steps(resumed_model, resumed, 5, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))
