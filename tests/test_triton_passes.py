"""The dense window's GPU passes (mfac_optim/kernels/triton_passes.py) against float64, run on the CPU under
Triton's interpreter when there is no GPU (conftest sets TRITON_INTERPRET=1), and MFAC with them in place against
the dense float64 solve. Skipped where Triton is not installed."""
import pytest
import torch

pytest.importorskip("triton")
import test_compressed  # noqa: E402
from mfac_optim import MFAC  # noqa: E402
from mfac_optim import window as window_module  # noqa: E402
from mfac_optim.compressed import BLOCK, CompressedRows  # noqa: E402
from mfac_optim.kernels import triton_passes  # noqa: E402
from mfac_optim.kernels.torch_passes import TorchPasses  # noqa: E402
from mfac_optim.storage import PartPlan  # noqa: E402
from test_mfac_optim import TOLERANCE, run_against_reference, set_random_grads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_passes_equal_float64_across_tiles_and_splits(dtype):
    # 37 rows (2 tiles of 16 and a part), 70,000 columns (3 splits of 32,768, the last partial), entries whose sizes
    # span e^±6: fp32 sums must stay within 1e-5 of the sum of the products' magnitudes.
    generator = torch.Generator().manual_seed(0)
    scales = torch.exp(2 * torch.randn(70_000, generator=generator)).clamp(max=1e4)
    window = (torch.randn(37, 70_000, generator=generator) * scales).to(dtype).to(DEVICE)
    exact = window.double()
    dots = triton_passes.window_dots(window, 5)
    assert dots.dtype == torch.float64
    assert ((dots - exact @ exact[5]).abs() <= 1e-5 * (exact.abs() @ exact[5].abs())).all()
    coefficients = torch.randn(37, generator=generator).to(DEVICE)
    result = torch.empty(70_000, device=DEVICE)
    triton_passes.window_combine(window, coefficients, result)
    expected, magnitude = exact.T @ coefficients.double(), exact.abs().T @ coefficients.double().abs()
    assert ((result.double() - expected).abs() <= 1e-5 * magnitude).all()


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_optimizer_with_the_triton_passes_matches_the_dense_solve(monkeypatch, grad_dtype):
    calls = []

    def triton_for_every_window(device, dtype, accumulate_dtype):
        calls.append(dtype)
        return triton_passes

    monkeypatch.setattr(window_module, "passes_for", triton_for_every_window)
    worst = run_against_reference([(40, 30), (30,), (7,)], 16, 1e-6, 40, grad_dtype=grad_dtype, device=DEVICE)
    assert calls and set(calls) == {grad_dtype}
    assert worst < TOLERANCE, worst


@pytest.mark.parametrize("filled", [6, 5])  # all slots, and the filled ones of a window still filling
@pytest.mark.parametrize("runs", [1, 4])  # partial sums over runs of slots (4: runs of 2, 2 and 2)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_passes_equal_float64_and_the_combine_repeats_bit_for_bit(monkeypatch, dtype, runs, filled):
    monkeypatch.setattr(triton_passes, "PARTIAL_BYTES", 4 * 4 * BLOCK * runs)
    size, generator = 3 * BLOCK + 100, torch.Generator().manual_seed(1)
    rows = CompressedRows.allocate(PartPlan(CompressedRows, 6, size, dtype, torch.float32, density=0.01), {},
                                   torch.device("cpu"), TorchPasses(torch.float32))
    for slot in range(5):  # slot 5 stays empty: its offsets are the initial distinct ones, its values zero
        rows.store(slot, torch.randn(size, generator=generator) * torch.exp(2 * torch.randn(size, generator=generator)))
    values, offsets = rows.values.to(DEVICE), rows.offsets.to(DEVICE)
    coefficients = torch.randn(filled, generator=generator).to(DEVICE)
    results = []
    for _ in range(2):
        result = torch.full((4 * BLOCK,), float("nan"), device=DEVICE)  # every entry must be written
        triton_passes.compressed_combine(values, offsets, coefficients, result, BLOCK, filled)
        results.append(result)
    stored = rows.to_dense().double().to(DEVICE)[:filled]
    dots = triton_passes.compressed_dots(values, offsets, 3, BLOCK, filled)
    assert ((dots - stored @ stored[3]).abs() <= 1e-12 * (stored.abs() @ stored[3].abs())).all()  # float64 sums
    expected, magnitude = stored.T @ coefficients.double(), stored.abs().T @ coefficients.double().abs()
    assert ((results[0][:size].double() - expected).abs() <= 1e-6 * magnitude).all()
    assert (results[0][size:] == 0).all() and torch.equal(results[0], results[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="test_compressed's CPU tensors reach Triton only through its "
                    "interpreter, which conftest turns on without CUDA")
def test_compressed_optimizer_with_the_triton_passes_matches_the_dense_solve(monkeypatch):
    monkeypatch.setattr(window_module, "passes_for", lambda device, dtype, accumulate_dtype: triton_passes)
    calls = []
    for name in ("compressed_dots", "compressed_combine"):
        kernel = getattr(triton_passes, name)
        monkeypatch.setattr(triton_passes, name,
                            lambda *args, kernel=kernel, name=name: calls.append(name) or kernel(*args))
    # The compressed test's six wraps at λ = 1e-6 (its first argument only labels the factor update's form).
    test_compressed.test_updates_equal_a_dense_float64_solve_over_the_stored_rows_across_wraps(
        "compiled", "bfloat16", 1e-6)
    assert calls.count("compressed_dots") == calls.count("compressed_combine") > 0  # the Triton passes ran


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("density,sparse_rows", [(1.0, None), (1.0, {0: 7}), (0.01, None)])
def test_cuda_steps_repeat_bit_for_bit(density, sparse_rows):
    """Dense, row-sparse and compressed windows on CUDA: two runs on the same gradients take the same steps to the
    bit (no float atomics in the passes), which is what a bit-identical resume needs."""
    shapes = [(120, 6), (6, 6), (6,)] if sparse_rows else [(40, 30), (30,), (7,)]
    runs = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(shape, generator=generator).cuda().requires_grad_() for shape in shapes]
        optimizer = MFAC(params, lr=1e-2, num_grads=8, damp=1e-6, density=density, grad_dtype="bfloat16")
        for _ in range(20):
            set_random_grads(params, generator, sparse_rows=sparse_rows)
            optimizer.step()
        runs.append([p.detach().cpu() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dense_passes_address_a_window_past_two_to_the_31_entries():
    """bert-mini's dense window at m = 1024 has 3.4 billion entries: row offsets must not wrap in int32. Three rows of
    2³⁰ + 64 bf16 entries (6.4 GB), row r constant r + 1 except a random tail, against float64 by hand."""
    rows, columns, tail = 3, (1 << 30) + 64, 4096
    window = torch.empty(rows, columns, dtype=torch.bfloat16, device="cuda")
    for row in range(rows):
        window[row].fill_(row + 1)
    window[:, -tail:] = torch.randn(rows, tail, device="cuda").bfloat16()
    ends = window[:, -tail:].double()
    counts = torch.arange(1, rows + 1, dtype=torch.float64, device="cuda")
    expected_dots = counts * counts[2] * (columns - tail) + ends @ ends[2]
    assert torch.allclose(triton_passes.window_dots(window, 2), expected_dots, rtol=1e-6, atol=0)
    coefficients = torch.tensor([0.5, -2.0, 1.25], device="cuda")
    result = torch.full((columns,), float("nan"), device="cuda")
    triton_passes.window_combine(window, coefficients, result)
    assert torch.all(result[:-tail] == (coefficients.double() @ counts).item())
    assert torch.allclose(result[-tail:].double(), coefficients.double() @ ends, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_sparse_dots_equal_float64(dtype):
    # 9 slots of 21 stored rows (2 tiles of 16, the second partial) of width 300 (a partial column tile); row 0
    # padding with zero values, as the storage pads.
    generator = torch.Generator().manual_seed(2)
    indices = torch.stack([torch.randperm(50, generator=generator)[:21] for _ in range(9)])
    indices[4, 15:] = 0
    values = torch.randn(9, 21, 300, generator=generator).to(dtype)
    values[4, 15:] = 0
    new = torch.randn(50, 300, generator=generator)
    dots = triton_passes.sparse_dots(indices.to(DEVICE), values.to(DEVICE), new.to(DEVICE))
    gathered = new.double()[indices]  # (slots, rows, columns)
    products = values.double() * gathered
    assert ((dots.cpu() - products.sum(dim=(1, 2))).abs() <= 1e-6 * products.abs().sum(dim=(1, 2))).all()


@pytest.mark.parametrize("runs", [1, 3])
def test_row_sparse_combine_equals_float64_and_repeats_bit_for_bit(monkeypatch, runs):
    # 9 slots of up to 70 stored rows (2 tiles of 64) of width 100 (2 column tiles), rows increasing, padded with
    # row 0; slot 2 stores the real row 0 first, slot 5 is empty. `runs` partial sums, through the bytes bound.
    rows, columns, slots, capacity = 200, 100, 9, 70
    monkeypatch.setattr(triton_passes, "PARTIAL_BYTES", 4 * rows * columns * runs)
    generator = torch.Generator().manual_seed(6)
    indices = torch.zeros(slots, capacity, dtype=torch.int64)
    values = torch.zeros(slots, capacity, columns)
    for slot, count in enumerate([70, 31, 64, 1, 50, 0, 65, 12, 70]):
        stored = torch.randperm(rows - 1, generator=generator)[:count].sort().values + 1
        if slot == 2:
            stored[0] = 0
        indices[slot, :count] = stored
        values[slot, :count] = torch.randn(count, columns, generator=generator)
    coefficients = torch.randn(slots, generator=generator)
    dense = torch.zeros(slots, rows, columns, dtype=torch.float64)
    dense.scatter_add_(1, indices[:, :, None].expand_as(values), values.double())
    expected = torch.einsum("j,jrc->rc", coefficients.double(), dense)
    magnitude = torch.einsum("j,jrc->rc", coefficients.double().abs(), dense.abs())
    results = []
    for _ in range(2):
        result = torch.full((rows, columns), float("nan"), device=DEVICE)  # every entry must be written
        triton_passes.sparse_combine(indices.to(DEVICE), values.to(DEVICE), coefficients.to(DEVICE), result)
        results.append(result.cpu())
    assert ((results[0].double() - expected).abs() <= 1e-6 * magnitude).all()
    assert torch.equal(results[0], results[1])


def test_row_sparse_optimizer_with_the_triton_passes_matches_the_dense_solve(monkeypatch):
    monkeypatch.setattr(window_module, "passes_for", lambda device, dtype, accumulate_dtype: triton_passes)
    worst = run_against_reference([(120, 6), (6, 6), (6,)], 16, 1e-6, 40, sparse_rows={0: 7}, device=DEVICE)
    assert "row_values" in run_against_reference.last_optimizer.state[
        run_against_reference.last_optimizer.param_groups[0]["params"][0]]
    assert worst < TOLERANCE, worst

