"""GradientWindow alone, without the optimizer: each step's F⁻¹g against a dense float64 solve over the gradients
it holds, across wrap-arounds, with a row-sparse part beside the dense one; and a window made again from its saved
state goes on identically."""
import pytest
import torch

from mfac_optim.layout import Layout
from mfac_optim.window import GradientWindow, WindowSettings

EMBEDDING, MATRIX, VECTOR = (40, 12), (12, 8), (7,)  # an embedding whose gradients touch few rows
TOUCHED_ROWS = 5


def gradient(generator: torch.Generator) -> torch.Tensor:
    """A flat gradient over the three parameters: dense for the matrix and vector, TOUCHED_ROWS rows of the
    embedding."""
    embedding = torch.zeros(EMBEDDING)
    rows = torch.randperm(EMBEDDING[0], generator=generator)[:TOUCHED_ROWS]
    embedding[rows] = torch.randn(TOUCHED_ROWS, EMBEDDING[1], generator=generator)
    return torch.cat([embedding.reshape(-1), torch.randn(MATRIX, generator=generator).reshape(-1),
                      torch.randn(VECTOR, generator=generator)])


def dense_solve(stored: list[torch.Tensor], g: torch.Tensor, damp: float, num_grads: int) -> torch.Tensor:
    """F⁻¹g in float64 with F = λI + (1/m) Σ gᵢgᵢᵀ over the stored gradients (the empty slots hold zeros)."""
    rows = torch.stack(stored).double()
    fisher = damp * torch.eye(g.numel(), dtype=torch.float64) + rows.T @ rows / num_grads
    return torch.linalg.solve(fisher, g.double())


@pytest.mark.parametrize("damp", [1e-2, 1e-4])
def test_each_direction_equals_a_dense_float64_solve_across_wraps(damp):
    num_grads, steps = 4, 11
    settings = WindowSettings(num_grads=num_grads, damp=damp, grad_dtype="float32", density=1.0, shard=False)
    layout = Layout((torch.Size(EMBEDDING), torch.Size(MATRIX), torch.Size(VECTOR)))
    generator = torch.Generator().manual_seed(0)
    gradients = [gradient(generator) for _ in range(steps)]
    window = GradientWindow.allocate(layout, settings, gradients[0], {}, [{}, {}, {}])
    assert list(window.sparse) == [0], "the embedding is kept row-sparse"
    slots = [torch.zeros_like(gradients[0]) for _ in range(num_grads)]
    for step, g in enumerate(gradients):
        slot = step % num_grads  # the oldest slot is replaced
        direction = window.insert_and_precondition(g)
        slots[slot] = g
        expected = dense_solve(slots, g, damp, num_grads)
        torch.testing.assert_close(direction.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert window.stored_bytes() == num_grads * (MATRIX[0] * MATRIX[1] + VECTOR[0]) * 4 + \
        num_grads * TOUCHED_ROWS * (EMBEDDING[1] * 4 + 8)  # dense slots; the rows' values and int64 indices


def test_a_window_made_from_its_saved_state_goes_on_identically():
    num_grads = 3
    settings = WindowSettings(num_grads=num_grads, damp=1e-3, grad_dtype="float32", density=1.0, shard=False)
    layout = Layout((torch.Size(EMBEDDING), torch.Size(MATRIX), torch.Size(VECTOR)))
    generator = torch.Generator().manual_seed(1)
    gradients = [gradient(generator) for _ in range(6)]
    shared, param_states = {}, [{}, {}, {}]
    window = GradientWindow.allocate(layout, settings, gradients[0], shared, param_states)
    for g in gradients[:4]:
        window.insert_and_precondition(g)
    assert set(param_states[0]) == {"row_indices", "row_values"} and not param_states[1] and not param_states[2]
    copies = ({key: value.clone() for key, value in shared.items()},
              [{key: value.clone() for key, value in state.items()} for state in param_states])
    restored = GradientWindow.from_state(layout, settings, *copies)
    assert restored.layout == window.layout  # the saved state says which blocks are row-sparse
    for g in gradients[4:]:
        assert torch.equal(window.insert_and_precondition(g), restored.insert_and_precondition(g))
