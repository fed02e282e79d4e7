"""MFAC against a dense float64 reference written here from the paper's definitions, plus its plumbing."""
import io
import warnings

import pytest
import torch

from mfac_optim import MFAC, algebra, memory_bound_bytes
from mfac_optim.config import GRAD_DTYPES
from mfac_optim.kernels import cpu_passes, passes_for
from mfac_optim.storage import DenseRows, PartPlan

TOLERANCE = 1e-4


class DenseReference:
    """M-FAC from the definitions: F = λI + (1/m) Σ gᵢgᵢᵀ over the stored gradients, u = F⁻¹g by a dense float64
    solve, momentum v ← μv + (1 − μ)u per group. The stored g is formed as the optimizer must form it (the
    gradient plus wd · p in fp32, or float64 for float64 parameters, rounded to the window dtype; zeros, without weight decay, for a parameter with no
    gradient this step); everything after that is float64. A parameter without a gradient is left alone, as
    torch.optim leaves it: no update (the caller's), and its velocity kept."""

    def __init__(self, num_grads, damp, grad_dtype=torch.float32):
        self.num_grads, self.damp, self.grad_dtype = num_grads, damp, grad_dtype
        self.rows = []
        self.slot = 0
        self.velocity = None

    def stored_gradient(self, groups):
        pieces = []
        for group in groups:
            for p in group["params"]:
                precision = torch.float64 if p.dtype == torch.float64 else torch.float32  # as torch.optim keeps it
                if p.grad is None:
                    pieces.append(torch.zeros(p.numel()))
                else:
                    pieces.append((p.grad.to(precision) + group["weight_decay"] * p.to(precision)).reshape(-1))
        return torch.cat(pieces).to(self.grad_dtype).double().cpu()  # the reference solves on the CPU

    def direction(self, groups):
        """Stores the new gradient and returns the per-group directions (after momentum) as one flat vector."""
        g = self.stored_gradient(groups)
        if len(self.rows) < self.num_grads:
            self.rows.append(g)
        else:
            self.rows[self.slot] = g
        self.slot = (self.slot + 1) % self.num_grads
        window = torch.stack(self.rows)
        fisher = self.damp * torch.eye(g.numel(), dtype=torch.float64) + window.T @ window / self.num_grads
        u = torch.linalg.solve(fisher, g)
        if self.velocity is None:
            self.velocity = torch.zeros_like(u)
        out, offset = u.clone(), 0
        for group in groups:
            mu = group["momentum"]
            for p in group["params"]:
                piece = slice(offset, offset + p.numel())
                if mu > 0 and p.grad is not None:
                    self.velocity[piece] = mu * self.velocity[piece] + (1 - mu) * u[piece]
                    out[piece] = self.velocity[piece]
                offset += p.numel()
        return out


def flat(params):
    return torch.cat([p.detach().double().reshape(-1) for p in params]).cpu()


def set_random_grads(params, generator, scale=0.1, none_mask=(), sparse_rows=None):
    """Random gradients; for parameter indices in `sparse_rows`, only that many random rows are non-zero, as in a
    word embedding's gradient."""
    for index, p in enumerate(params):
        grad = scale * torch.randn(p.shape, generator=generator)
        if sparse_rows and index in sparse_rows:
            keep = torch.randperm(p.shape[0], generator=generator)[:sparse_rows[index]]
            grad = torch.zeros_like(grad).index_copy_(0, keep, grad[keep])
        p.grad = None if index in none_mask else grad.to(p.device)


def run_against_reference(shapes, num_grads, damp, steps, grad_dtype=torch.float32, group_options=None,
                          none_every=0, device="cpu", sparse_rows=None, before_step=None, scale_of_step=lambda step: 0.1):
    """Steps MFAC and the reference on the same gradients; returns the worst relative error of an update.
    `before_step(step, optimizer)` may change the optimizer's groups before a step; `scale_of_step(step)` is the
    gradients' entry scale."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=generator).to(device).requires_grad_() for shape in shapes]
    group_options = group_options or [{}]
    split = len(params) // len(group_options) or 1
    groups = [{"params": params[i * split:(i + 1) * split] if i < len(group_options) - 1 else params[i * split:], **opts}
              for i, opts in enumerate(group_options)]
    optimizer = MFAC(groups, num_grads=num_grads, damp=damp, grad_dtype=grad_dtype)
    reference = DenseReference(num_grads, damp, grad_dtype)
    worst = 0.0
    for step in range(steps):
        none_mask = {step % len(params)} if none_every and step % none_every == 0 else ()
        set_random_grads(params, generator, scale_of_step(step), none_mask=none_mask, sparse_rows=sparse_rows)
        if before_step is not None:
            before_step(step, optimizer)
        before = flat(params)
        expected_direction = reference.direction(optimizer.param_groups)
        # An lr read afresh each step (as a scheduler sets it) that moves the parameters by ~10% of their norm
        # keeps the fp32 rounding of p − lr·u far below the tolerance.
        expected_update, offset = torch.zeros_like(before), 0
        for group in optimizer.param_groups:
            group["lr"] = group.get("lr_scale", 1.0) * 0.1 * before.norm().item() / expected_direction.norm().item()
            for p in group["params"]:
                if p.grad is not None:
                    piece = slice(offset, offset + p.numel())
                    expected_update[piece] = -group["lr"] * expected_direction[piece]
                offset += p.numel()
        optimizer.step()
        update = flat(params) - before
        worst = max(worst, ((update.cpu() - expected_update.cpu()).norm() / expected_update.norm()).item())
    run_against_reference.last_optimizer = optimizer
    return worst


@pytest.mark.parametrize("damp", [1e-2, 1e-4, 1e-6])
@pytest.mark.parametrize(
    "shapes,num_grads,steps",
    [
        ([(40, 30), (30,), (7,)], 16, 40),  # m < d, two and a half ring wrap-arounds
        ([(9, 5), (5,)], 64, 150),  # m > d: the window is rank-deficient
        ([(12, 10)], 60, 70),  # m ≈ d/2: nearly rank-deficient
        ([(20, 3)], 1, 5),  # m = 1
    ],
)
def test_updates_match_dense_float64_solve(shapes, num_grads, steps, damp):
    assert run_against_reference(shapes, num_grads, damp, steps) < TOLERANCE


@pytest.mark.parametrize("grad_dtype", ["bfloat16", "float16", torch.bfloat16])
def test_low_precision_window_matches_reference_on_rounded_gradients(grad_dtype):
    dtype = GRAD_DTYPES[grad_dtype] if isinstance(grad_dtype, str) else grad_dtype
    assert run_against_reference([(40, 30), (30,)], 16, 1e-6, 40, grad_dtype=dtype) < TOLERANCE
    assert run_against_reference([(9, 5)], 64, 1e-6, 100, grad_dtype=dtype) < TOLERANCE


def test_momentum_two_groups_weight_decay_and_missing_grads():
    group_options = [
        {"momentum": 0.9, "weight_decay": 0.01},
        {"momentum": 0.5, "weight_decay": 0.0, "lr_scale": 3.0},
    ]
    worst = run_against_reference([(20, 10), (10,), (10, 6), (6,)], 8, 1e-4, 30, group_options=group_options,
                                  none_every=3)
    assert worst < TOLERANCE


EMBEDDING_SHAPES = [(120, 6), (6, 6), (6,)]  # a word-embedding-like matrix first, then dense parameters


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_grads,steps", [(16, 40), (200, 30)])  # m < d/4, and m > d/4 (float64 passes)
def test_row_sparse_storage_matches_dense_reference(grad_dtype, num_grads, steps, kernel_threads):
    # The embedding's gradient touches 5 to 11 rows of 120 per step, so its rows are stored sparsely (and the
    # capacity grows past the first step's row count).
    rows = {0: 5}

    def vary_rows(step, optimizer):
        rows[0] = 5 + step % 7

    worst = run_against_reference(EMBEDDING_SHAPES, num_grads, 1e-6, steps, grad_dtype=grad_dtype,
                                  sparse_rows=rows, before_step=vary_rows)
    optimizer = run_against_reference.last_optimizer
    embedding = optimizer.param_groups[0]["params"][0]
    state = optimizer.state[embedding]
    assert state["row_values"].shape[0] == num_grads and 11 <= state["row_values"].shape[1] <= 14  # grown by 1/4 steps
    assert state["row_values"].dtype == grad_dtype
    assert state["window"].shape == (num_grads, 6 * 6 + 6)  # only the dense parameters
    assert worst < TOLERANCE


@pytest.mark.parametrize("storage", ["dense", "row-sparse"])
def test_updates_match_the_dense_solve_over_six_wraps_with_norms_varying_100x(update_form, storage):
    # λ = 1e-6; the gradient scale cycles through 0.1 … 10 (100×) with period 5, against a window of 16: every
    # window mixes all scales. The m × m factor is made once and updated from then on.
    shapes, rows = ([(40, 30), (30,), (7,)], None) if storage == "dense" else (EMBEDDING_SHAPES, {0: 7})
    worst = run_against_reference(shapes, 16, 1e-6, 6 * 16 + 3, sparse_rows=rows,
                                  scale_of_step=lambda step: 10.0 ** (step % 5 / 2 - 1))
    optimizer = run_against_reference.last_optimizer
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert ("row_values" in state) == (storage == "row-sparse")
    assert int(state["refactorizations"]) == 1
    assert worst < TOLERANCE, worst


def test_refactoring_every_step_as_on_a_gpu_matches_the_dense_solve(monkeypatch):
    monkeypatch.setattr(algebra, "refactors_every_step", lambda device: True)
    worst = run_against_reference(EMBEDDING_SHAPES, 16, 1e-6, 2 * 16 + 3, sparse_rows={0: 7},
                                  scale_of_step=lambda step: 10.0 ** (step % 5 / 2 - 1))
    optimizer = run_against_reference.last_optimizer
    assert int(optimizer.state[optimizer.param_groups[0]["params"][0]]["refactorizations"]) == 2 * 16 + 3
    assert worst < TOLERANCE, worst


def test_row_sparse_parameter_moves_to_dense_storage_when_rows_fill():
    # Weight decay from step 10 on makes every row of the embedding's g non-zero: row storage no longer pays.
    def start_weight_decay(step, optimizer):
        if step == 10:
            optimizer.param_groups[0]["weight_decay"] = 0.01

    worst = run_against_reference(EMBEDDING_SHAPES, 16, 1e-6, 30, sparse_rows={0: 6}, before_step=start_weight_decay)
    optimizer = run_against_reference.last_optimizer
    embedding = optimizer.param_groups[0]["params"][0]
    assert "row_indices" not in optimizer.state[embedding]
    assert optimizer.state[embedding]["window"].shape == (16, 120 * 6 + 6 * 6 + 6)
    assert not optimizer._window.sparse  # the window holds no row-sparse part, nor its scratch, any more
    assert worst < TOLERANCE


def test_memory_bytes_counts_the_state():
    p = torch.zeros(1000, 8, requires_grad=True)
    q = torch.zeros(50, requires_grad=True)
    optimizer = MFAC([p, q], num_grads=4, grad_dtype="bfloat16", momentum=0.5)
    assert optimizer.memory_bytes() == 0
    p.grad = torch.zeros(1000, 8)
    p.grad[[3, 7]] = 1.0
    q.grad = torch.ones(50)
    optimizer.step()
    # rows: 4 slots × 2 rows × (8 bf16 + one int64); dense: 4 × 50 bf16; Gram matrix and its factor 4 × 4 float64;
    # momentum 8050 fp32; five int64 counters (steps, skipped steps, shard rank and world size, refactorizations)
    # and the factor's λ (float64).
    assert optimizer.memory_bytes() == 4 * 2 * (8 * 2 + 8) + 4 * 50 * 2 + 2 * 16 * 8 + 8050 * 4 + 5 * 8 + 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cpu_passes_against_float64(dtype, kernel_threads):
    # 3 column blocks of 8192 and a remainder, and m = 7 (not a multiple of the 4 rows taken at a time).
    kernels = cpu_passes()
    assert kernels is not None, "the fused CPU kernels must build on the CI machine"
    generator = torch.Generator().manual_seed(0)
    window = torch.randn(7, 3 * 8192 + 13, generator=generator).to(dtype)
    assert passes_for(torch.device("cpu"), dtype, torch.float32) is kernels
    rows = DenseRows({"window": window}, PartPlan(DenseRows, 7, window.shape[1], dtype, torch.float32), kernels)
    exact = window.double()
    # Off-diagonal dots of random rows are far smaller than their terms: bound the error by the terms' scale (n).
    dots = rows.dots(2, 7)
    torch.testing.assert_close(dots, exact @ exact[2], rtol=1e-5, atol=1e-7 * window.shape[1])
    # A window filled up to 5 rows: the passes visit those alone, and each row's dot is summed as in the full window.
    assert torch.equal(rows.dots(2, 5), dots[:5])
    coefficients = torch.randn(7, dtype=torch.float64, generator=generator)
    for filled in (7, 5):
        torch.testing.assert_close(rows.combine(coefficients[:filled]).double(),
                                   exact[:filled].T @ coefficients[:filled].float().double(), rtol=1e-5, atol=1e-5)


def test_single_gradient_window_by_hand():
    # m = 1: F = λI + ggᵀ, so F⁻¹g = g / (λ + ‖g‖²) (Sherman–Morrison).
    p = torch.zeros(3, requires_grad=True)
    optimizer = MFAC([p], lr=1.0, num_grads=1, damp=0.5)
    p.grad = torch.tensor([1.0, 2.0, 2.0])
    optimizer.step()
    torch.testing.assert_close(p.detach(), -torch.tensor([1.0, 2.0, 2.0]) / 9.5)


def test_two_step_window_by_hand():
    # m = 2, orthogonal gradients g₁ = (1,0), g₂ = (0,2): F = λI + diag(1, 4)/2, so u₂ = (0, 2/(λ + 2)).
    p = torch.zeros(2, requires_grad=True)
    optimizer = MFAC([p], lr=1.0, num_grads=2, damp=0.25)
    p.grad = torch.tensor([1.0, 0.0])
    optimizer.step()
    # u₁ = g₁ / (λ + ‖g₁‖²/2) = (1/0.75, 0)
    torch.testing.assert_close(p.detach(), torch.tensor([-1 / 0.75, 0.0]))
    p.grad = torch.tensor([0.0, 2.0])
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-1 / 0.75, -2 / 2.25]))


class BagOfWords(torch.nn.Module):
    """An embedding (row-sparse gradients) and a small classifier."""

    def __init__(self, vocabulary=500, width=6, hidden=5):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocabulary, width)
        self.hidden = torch.nn.Linear(width, hidden)
        self.out = torch.nn.Linear(hidden, 2)

    def forward(self, tokens):
        return self.out(torch.tanh(self.hidden(self.embedding(tokens).mean(1))))


def make_model_and_optimizer(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = BagOfWords()
    groups = [
        {"params": [model.hidden.weight, model.out.weight], "weight_decay": 0.01},
        {"params": [model.embedding.weight, model.hidden.bias, model.out.bias], "weight_decay": 0.0},
    ]
    return model, MFAC(groups, lr=1e-2, **kwargs)


def train_steps(model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, 500, (8, 5), generator=generator)
        y = torch.randint(0, 2, (8,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(tokens), y).backward()
        optimizer.step()


@pytest.mark.parametrize("grad_dtype", ["float32", "bfloat16"])
def test_state_dict_round_trip_continues_bit_identically(grad_dtype):
    options = dict(num_grads=4, damp=1e-3, momentum=0.9, grad_dtype=grad_dtype)
    model, optimizer = make_model_and_optimizer(**options)
    train_steps(model, optimizer, 6, seed=1)  # past one ring wrap-around

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model, resumed_optimizer = make_model_and_optimizer(seed=99, **options)
    resumed_model.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])

    state = resumed_optimizer.state[resumed_model.hidden.weight]
    assert state["gram"].dtype == state["factor"].dtype == torch.float64  # the updated factor is state: no refactor
    assert int(state["refactorizations"]) == 1 and float(state["factor_damp"]) == 1e-3
    assert state["window"].dtype == GRAD_DTYPES[grad_dtype]
    assert int(state["step"]) == 6
    assert resumed_optimizer.state[resumed_model.embedding.weight]["row_values"].dtype == GRAD_DTYPES[grad_dtype]

    train_steps(model, optimizer, 5, seed=2)
    train_steps(resumed_model, resumed_optimizer, 5, seed=2)
    for original, resumed in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(original, resumed)
    assert torch.equal(optimizer.state[model.hidden.weight]["factor"], state["factor"])


def test_nonfinite_gradient_skips_step_and_warns_once():
    model, optimizer = make_model_and_optimizer(num_grads=4)
    train_steps(model, optimizer, 2, seed=1)
    state = optimizer.state[model.hidden.weight]
    before_params = [p.detach().clone() for p in model.parameters()]
    before_window, before_gram = state["window"].clone(), state["gram"].clone()

    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.out.bias.grad[0] = float("nan")
    with pytest.warns(UserWarning, match="NaN or Inf"):
        optimizer.step()
    model.out.bias.grad[0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()

    assert all(torch.equal(a, b) for a, b in zip(before_params, model.parameters()))
    assert torch.equal(state["window"], before_window) and torch.equal(state["gram"], before_gram)
    assert int(state["skipped_steps"]) == 2 and int(state["step"]) == 2


def test_nonfinite_gradients_before_the_first_stored_one_are_counted_and_saved():
    model, optimizer = make_model_and_optimizer(num_grads=4)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.warns(UserWarning, match="NaN or Inf"):
        optimizer.step()
    optimizer.step()
    state = optimizer.state[model.hidden.weight]
    assert "window" not in state and int(state["skipped_steps"]) == 2

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed_model, resumed_optimizer = make_model_and_optimizer(num_grads=4)
    resumed_optimizer.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    resumed_state = resumed_optimizer.state[resumed_model.hidden.weight]
    assert int(resumed_state["skipped_steps"]) == 2

    train_steps(resumed_model, resumed_optimizer, 1, seed=1)  # the first stored gradient keeps the count
    assert int(resumed_state["skipped_steps"]) == 2 and int(resumed_state["step"]) == 1
    for p in resumed_model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    with pytest.warns(UserWarning, match="NaN or Inf"):
        resumed_optimizer.step()
    assert int(resumed_state["skipped_steps"]) == 3 and int(resumed_state["step"]) == 1


@pytest.mark.parametrize("grad_dtype", ["float32", "bfloat16"])
def test_memory_bound_holds_the_measured_state(grad_dtype):
    model, optimizer = make_model_and_optimizer(num_grads=6, momentum=0.5, grad_dtype=grad_dtype)
    train_steps(model, optimizer, 9, seed=3)  # wraps the window; batches of 8 × 5 tokens touch ≤ 40 embedding rows
    params = [p for group in optimizer.param_groups for p in group["params"]]
    embedding = next(i for i, p in enumerate(params) if p is model.embedding.weight)
    bound = memory_bound_bytes([p.shape for p in params], {embedding: 40}, 6, grad_dtype, momentum=True)
    assert optimizer.state[model.embedding.weight]["row_values"].shape[1] <= 50  # capacity: 40 rows grown by 5/4
    assert optimizer.memory_bytes() <= bound


def test_closure_is_evaluated_with_grad_and_loss_returned():
    model, optimizer = make_model_and_optimizer(num_grads=4)
    tokens, y = torch.randint(0, 500, (8, 5)), torch.randint(0, 2, (8,))

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(tokens), y)
        loss.backward()
        return loss

    before = model.hidden.weight.detach().clone()
    loss = optimizer.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    assert not torch.equal(before, model.hidden.weight)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lr": -1.0}, "Invalid learning rate: -1.0"),
        ({"lr": float("nan")}, "Invalid learning rate: nan"),
        ({"num_grads": 0}, "Invalid num_grads: 0"),
        ({"num_grads": 2.5}, "Invalid num_grads: 2.5"),
        ({"num_grads": True}, "Invalid num_grads: True"),
        ({"damp": 0.0}, "Invalid damp: 0.0"),
        ({"damp": -1e-6}, "Invalid damp: -1e-06"),
        ({"damp": float("inf")}, "Invalid damp: inf"),
        ({"momentum": 1.0}, "Invalid momentum: 1.0"),
        ({"momentum": -0.1}, "Invalid momentum: -0.1"),
        ({"weight_decay": -0.5}, "Invalid weight_decay: -0.5"),
        ({"grad_dtype": "int8"}, "Invalid grad_dtype: 'int8'"),
        ({"grad_dtype": torch.int32}, "Invalid grad_dtype: torch.int32"),
    ],
)
def test_invalid_arguments_are_rejected_with_their_name(kwargs, message):
    with pytest.raises(ValueError, match="allowed|must") as error:
        MFAC([torch.zeros(2, requires_grad=True)], **kwargs)
    assert message in str(error.value)


def test_groups_must_share_the_window_settings():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid num_grads in param group 1: 8"):
        MFAC([{"params": [a]}, {"params": [b], "num_grads": 8}], num_grads=4)
    with pytest.raises(ValueError, match="Invalid momentum: 2"):
        MFAC([{"params": [a]}, {"params": [b], "momentum": 2}])


@pytest.mark.parametrize("key,value", [("damp", 1e-3), ("num_grads", 8), ("grad_dtype", "bfloat16"), ("density", 0.5),
                                       ("shard", True)])
def test_a_window_setting_changed_in_one_group_later_is_an_error_naming_it(key, value):
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    optimizer = MFAC([{"params": [a]}, {"params": [b]}], num_grads=4)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    optimizer.step()
    optimizer.param_groups[1][key] = value
    before = a.detach().clone()
    with pytest.raises(ValueError, match=f"Invalid {key} in param group 1: {value!r}"):
        optimizer.step()
    assert torch.equal(a, before)  # refused before anything moved


@pytest.mark.parametrize("key,value,made", [("num_grads", 8, "4"), ("grad_dtype", "bfloat16", "float32"),
                                            ("density", 0.5, "1.0")])
def test_a_window_setting_changed_in_every_group_after_the_window_exists_is_an_error(key, value, made):
    a = torch.ones(3, requires_grad=True)
    optimizer = MFAC([a], num_grads=4)
    a.grad = torch.ones(3)
    optimizer.step()
    optimizer.param_groups[0][key] = value
    with pytest.raises(ValueError, match=f"Invalid {key}: {value!r} \\(the window was made with {made}"):
        optimizer.step()


def test_a_checkpoint_resumed_with_another_window_setting_is_an_error():
    a = torch.ones(3, requires_grad=True)
    optimizer = MFAC([a], num_grads=4, density=0.5)
    a.grad = torch.ones(3)
    optimizer.step()
    for key, value, made in (("num_grads", 8, "4"), ("density", 0.25, "another density"), ("density", 1.0, "another density")):
        resumed = MFAC([a], num_grads=4, density=0.5)
        resumed.load_state_dict(optimizer.state_dict())  # the saved groups come back with their settings
        resumed.param_groups[0][key] = value  # then edited, before the window is made again from the state
        with pytest.raises(ValueError, match=f"Invalid {key}: {value!r} \\(the window was made with {made}"):
            resumed.step()


def test_damp_may_change_in_every_group_and_remakes_the_factor():
    a = torch.ones(3, requires_grad=True)
    optimizer = MFAC([a], num_grads=4, damp=1e-6)
    for step in range(3):
        a.grad = torch.tensor([1.0, 2.0, 3.0]) * (step + 1)
        optimizer.step()
        optimizer.param_groups[0]["damp"] = 1e-3
    assert int(optimizer.state[a]["refactorizations"]) == 2  # made for 1e-6, remade for 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_dense_reference(grad_dtype):
    worst = run_against_reference([(60, 30), (30,)], 32, 1e-6, 70, grad_dtype=grad_dtype, device="cuda")
    assert worst < TOLERANCE
    p = torch.zeros(3, device="cuda", requires_grad=True)
    optimizer = MFAC([p], num_grads=2, grad_dtype=grad_dtype)
    p.grad = torch.ones(3, device="cuda")
    optimizer.step()
    assert optimizer.state[p]["window"].device.type == "cuda"



def test_the_settings_declared_once_drive_the_signature_the_arguments_and_old_param_groups():
    import inspect

    from mfac_optim.config import defaults
    from mfac_optim.hf.arguments import MFACArguments

    signature = {name: parameter.default for name, parameter in inspect.signature(MFAC).parameters.items()
                 if name != "params"}
    assert signature == defaults() == MFAC([torch.nn.Parameter(torch.zeros(3))]).defaults
    assert MFACArguments.parse(None, defaults()["lr"], defaults()["weight_decay"]).kwargs() == defaults()
    with pytest.raises(TypeError, match="unknown setting.*num_grad.*allowed: lr, num_grads"):
        MFAC([torch.nn.Parameter(torch.zeros(3))], num_grad=8)
    assert MFAC([torch.nn.Parameter(torch.zeros(3))], grad_dtype=torch.bfloat16).defaults["grad_dtype"] == "bfloat16"
    # A param group saved before a setting existed gets its default when loaded.
    optimizer = MFAC([torch.nn.Parameter(torch.zeros(3))], num_grads=8)
    old = optimizer.state_dict()
    for group in old["param_groups"]:
        del group["shard"], group["density"]
    restored = MFAC([torch.nn.Parameter(torch.zeros(3))])
    restored.__setstate__({"state": {}, "param_groups": old["param_groups"], "defaults": {}})
    assert {key: restored.param_groups[0][key] for key in defaults()} == {**defaults(), "num_grads": 8}


def test_window_and_held_bytes_by_hand():
    params = [torch.nn.Parameter(torch.randn(10, 3)), torch.nn.Parameter(torch.randn(7))]
    optimizer = MFAC(params, num_grads=4, grad_dtype="bfloat16")
    assert optimizer.window_bytes() == 0 and optimizer.memory_bytes(with_buffers=True) == 0  # nothing before a step
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert optimizer.window_bytes() == 4 * 37 * 2  # num_grads × parameters × bf16
    # Held: the state (window, the float64 Gram matrix and its factor, counters) plus the flat fp32 gradient.
    assert optimizer.memory_bytes(with_buffers=True) >= optimizer.memory_bytes() + 37 * 4
    assert optimizer.memory_bytes() >= 4 * 37 * 2 + 2 * 4 * 4 * 8


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_param_group_added_after_steps_joins_with_zero_history(momentum):
    # Gradual unfreezing: a second group joins after 6 steps of a 4-slot window (past a wrap). Against the float64
    # solve over the stored gradients, the new parameters' coordinates zero in every gradient stored before them.
    generator = torch.Generator().manual_seed(0)
    first = [torch.randn(6, 5, generator=generator).requires_grad_(),
             torch.randn(5, generator=generator).requires_grad_()]
    added = [torch.randn(5, 3, generator=generator).requires_grad_()]
    num_grads, damp = 4, 1e-3
    optimizer = MFAC(first, lr=0.05, num_grads=num_grads, damp=damp, momentum=momentum)
    rows, velocity, worst = [], None, 0.0
    for step in range(12):
        if step == 6:
            optimizer.add_param_group({"params": added})
            rows = [torch.cat([row, torch.zeros(sum(p.numel() for p in added), dtype=torch.float64)]) for row in rows]
            velocity = torch.cat([velocity, torch.zeros(sum(p.numel() for p in added), dtype=torch.float64)])
        params = first + (added if step >= 6 else [])
        set_random_grads(params, generator)
        g = torch.cat([p.grad.double().reshape(-1) for p in params])
        if len(rows) < num_grads:
            rows.append(g)
        else:
            rows[step % num_grads] = g  # the ring's oldest slot
        window = torch.stack(rows)
        u = torch.linalg.solve(damp * torch.eye(g.numel(), dtype=torch.float64) + window.T @ window / num_grads, g)
        velocity = torch.zeros_like(u) if velocity is None else velocity
        velocity = momentum * velocity + (1 - momentum) * u if momentum else u
        before = flat(params)
        optimizer.step()
        expected = -0.05 * velocity
        worst = max(worst, ((flat(params) - before - expected).norm() / expected.norm()).item())
    assert worst < TOLERANCE


@pytest.mark.parametrize("grad_dtype", ["float64", "float32"])
def test_float64_parameters_get_a_float64_step(grad_dtype):
    # Against the dense float64 solve over the stored gradients (float64 ones, or the float32-rounded ones): only
    # float64 rounding is left, where fp32 algebra would leave ~1e-7.
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(12, 9, generator=generator, dtype=torch.float64).requires_grad_(),
              torch.randn(9, generator=generator, dtype=torch.float64).requires_grad_()]
    optimizer = MFAC(params, lr=0.05, num_grads=8, damp=1e-4, grad_dtype=grad_dtype, momentum=0.5)
    reference = DenseReference(8, 1e-4, GRAD_DTYPES[grad_dtype])
    worst = 0.0
    for _ in range(20):  # past two wraps of the ring
        for p in params:
            p.grad = 0.1 * torch.randn(p.shape, generator=generator, dtype=torch.float64)
        expected = -0.05 * reference.direction(optimizer.param_groups)
        before = flat(params)
        optimizer.step()
        worst = max(worst, ((flat(params) - before - expected).norm() / expected.norm()).item())
    assert worst < 1e-10, worst
    assert optimizer.state[params[0]]["momentum_buffer"].dtype == torch.float64
