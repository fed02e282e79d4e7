"""M-FAC: matrix-free inverse empirical Fisher preconditioning (Frantar, Kurtic, Alistarh, NeurIPS 2021).

Notation (as in ../shared/DESIGN.md): d parameters, a window G (m × d) of the last m gradients (empty slots are
zero rows), damp λ > 0, and the dampened empirical Fisher F = λI + (1/m) GᵀG. Each step stores the new gradient g
as row i of G and moves the parameters along u = F⁻¹g.

Because g is itself row i of G, Woodbury gives u = m · Gᵀ K⁻¹ eᵢ with K = mλI + GGᵀ (m × m). Unlike the reference
form g/λ − Gᵀ(…)/λ, this subtracts no two huge vectors, so it keeps its digits for tiny λ. Per step: one pass over
the window for the dot products s = G g (which also refresh row and column i of the Gram matrix S = GGᵀ, kept in
float64), one float64 Cholesky solve of the m × m system, and one pass for the combination Gᵀ y.

`GradientWindow` is the arithmetic on flat vectors; `MFAC` is the torch.optim plumbing around it.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

GRAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Hyperparameters that define the one shared window, so every param group must agree on them.
WINDOW_KEYS = ("num_grads", "damp", "grad_dtype")

# Columns per block in the window passes: partial sums of one block are accumulated in fp32 and the blocks are
# summed in float64, which bounds the rounding error by the block length rather than by d.
BLOCK_COLUMNS = 1 << 16


def resolve_grad_dtype(value: Union[str, torch.dtype]) -> str:
    """Returns the canonical name ("float32", "bfloat16", "float16") of a window dtype given as name or dtype."""
    for name, dtype in GRAD_DTYPES.items():
        if value == name or value is dtype:
            return name
    raise ValueError(f"Invalid grad_dtype: {value!r} (allowed: {', '.join(GRAD_DTYPES)} or the torch dtypes)")


class GradientWindow:
    """A ring buffer of gradients with its float64 Gram matrix; computes u = F⁻¹g for each new gradient g.

    It works on tensors it is handed (the optimizer keeps them in its state); it holds only a conversion buffer.
    """

    def __init__(self, window: Tensor, gram: Tensor, damp: float) -> None:
        self.window = window  # (m, d), storage dtype
        self.gram = gram  # (m, m) float64, S = G Gᵀ
        self.damp = damp
        # When d is not far above m, the window is (nearly) rank-deficient: σ_min(G) ∝ √d − √m for gradient-like
        # data, and exactly 0 once d < m. Then y = K⁻¹eᵢ has components of size up to 1/(mλ) along (near-)null
        # directions of Gᵀ, which must cancel in Gᵀy, and fp32 passes lose up to three digits at λ = 1e-6.
        # Such a window holds at most 4m² numbers, so float64 passes cost less than the m³/3 Cholesky.
        self.accumulate_dtype = torch.float64 if window.shape[1] < 4 * window.shape[0] else torch.float32
        self._block_buffer: Optional[Tensor] = None

    @property
    def num_grads(self) -> int:
        return self.window.shape[0]

    def insert_and_precondition(self, grad: Tensor, slot: int) -> Tensor:
        """Stores `grad` in row `slot` and returns F⁻¹ĝ in fp32, where ĝ is the stored (possibly rounded) row."""
        self.window[slot].copy_(grad)
        dots = self.dots_with(self.window[slot])
        self.gram[slot, :] = dots
        self.gram[:, slot] = dots
        coefficients = self.num_grads * self.inverse_kernel_column(slot)
        return self.combine(coefficients)

    def dots_with(self, vector: Tensor) -> Tensor:
        """s = G v in float64 (first pass over the window)."""
        dots = torch.zeros(self.num_grads, dtype=torch.float64, device=self.window.device)
        for columns, block in self._column_blocks():
            dots += torch.mv(block, vector[columns].to(self.accumulate_dtype))
        return dots

    def inverse_kernel_column(self, slot: int) -> Tensor:
        """y = K⁻¹ eᵢ with K = mλI + S, by a float64 Cholesky factorisation."""
        kernel = self.gram.clone()
        kernel.diagonal().add_(self.num_grads * self.damp)
        unit = torch.zeros(self.num_grads, 1, dtype=torch.float64, device=self.gram.device)
        unit[slot] = 1.0
        return torch.cholesky_solve(unit, torch.linalg.cholesky(kernel)).squeeze(1)

    def combine(self, coefficients: Tensor) -> Tensor:
        """Gᵀ c in fp32 (second pass over the window)."""
        result = torch.empty(self.window.shape[1], dtype=torch.float32, device=self.window.device)
        coefficients = coefficients.to(self.accumulate_dtype)
        for columns, block in self._column_blocks():
            result[columns] = torch.mv(block.t(), coefficients)
        return result

    def _column_blocks(self) -> Iterator[tuple[slice, Tensor]]:
        """The window in blocks of columns, in the accumulation dtype. A block of another dtype is converted into
        one reused buffer: fresh allocations of this size cost more in page faults than the conversion."""
        for start in range(0, self.window.shape[1], BLOCK_COLUMNS):
            columns = slice(start, start + BLOCK_COLUMNS)
            block = self.window[:, columns]
            if block.dtype != self.accumulate_dtype:
                if self._block_buffer is None:
                    self._block_buffer = torch.empty(self.num_grads, min(BLOCK_COLUMNS, self.window.shape[1]),
                                                     dtype=self.accumulate_dtype, device=self.window.device)
                block = self._block_buffer[:, :block.shape[1]].copy_(block)
            yield columns, block


def _check_finite_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number > 0)")


def _check_group_hyperparameters(group: dict) -> None:
    lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
    if isinstance(lr, Tensor) or not isinstance(lr, (int, float)) or not lr >= 0 or not math.isfinite(lr):
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a finite number >= 0)")
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0 or not math.isfinite(weight_decay):
        raise ValueError(f"Invalid weight_decay: {weight_decay!r} (must be a finite number >= 0)")
    if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"Invalid momentum: {momentum!r} (must satisfy 0 <= momentum < 1)")
    num_grads = group["num_grads"]
    if not isinstance(num_grads, int) or isinstance(num_grads, bool) or num_grads < 1:
        raise ValueError(f"Invalid num_grads: {num_grads!r} (must be a positive integer)")
    _check_finite_positive("damp", group["damp"])


class MFAC(Optimizer):
    """M-FAC with a window of the last `num_grads` gradients over all parameters of all groups.

    Args:
        params: tensors or param-group dicts. `lr`, `weight_decay` and `momentum` may differ per group;
            `num_grads`, `damp` and `grad_dtype` describe the one shared window and must not.
        lr: learning rate, read from the group at every step (LR schedulers work).
        num_grads: m, the number of gradients in the window.
        damp: λ in F = λI + (1/m) GᵀG.
        momentum: μ of the exponential average v ← μv + (1 − μ)u of the directions (0 disables it).
        weight_decay: coupled L2: g ← g + weight_decay · p before g enters the window.
        grad_dtype: storage dtype of the window ("float32", "bfloat16", "float16" or the torch dtype). With a
            low-precision window the rounded gradient is the one preconditioned, so window and direction agree.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        num_grads: int = 1024,
        damp: float = 1e-6,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        grad_dtype: Union[str, torch.dtype] = torch.float32,
    ) -> None:
        defaults = dict(
            lr=lr,
            num_grads=num_grads,
            damp=damp,
            momentum=momentum,
            weight_decay=weight_decay,
            grad_dtype=resolve_grad_dtype(grad_dtype),
        )
        _check_group_hyperparameters(defaults)
        self._warned_nonfinite = False
        self._window: Optional[GradientWindow] = None  # a view of the state tensors, rebuilt when they change
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        if "grad_dtype" in param_group:
            param_group["grad_dtype"] = resolve_grad_dtype(param_group["grad_dtype"])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group_hyperparameters(group)
        first = self.param_groups[0]
        for key in WINDOW_KEYS:
            if group[key] != first[key]:
                raise ValueError(
                    f"Invalid {key} in param group {len(self.param_groups) - 1}: {group[key]!r} "
                    f"(all groups share one window, so it must equal {first[key]!r})"
                )
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(f"MFAC needs all parameters on one device, got {sorted(map(str, devices))}")

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim, except that the window state keeps its dtypes (torch would cast the float64 Gram
        matrix and a bf16 window to the parameters' dtype)."""
        saved_state = dict(state_dict["state"])
        window_state = saved_state.pop(state_dict["param_groups"][0]["params"][0], None)
        super().load_state_dict({**state_dict, "state": saved_state})
        if window_state is not None:
            device = self._params()[0].device
            self.state[self._params()[0]] = {
                key: value.to(device=device, copy=True) if key not in ("step", "skipped_steps") else value.clone()
                for key, value in window_state.items()
            }

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Performs one M-FAC step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        grad = self._flat_gradient()
        state = self._window_state(grad)
        if not torch.isfinite(grad).all():
            self._skip_nonfinite(state)
            return loss

        window = self._gradient_window(state)
        slot = int(state["step"]) % window.num_grads
        direction = window.insert_and_precondition(grad, slot)
        state["step"] += 1
        self._apply(direction, state)
        return loss

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _flat_gradient(self) -> Tensor:
        """g over all groups in order: each parameter's gradient (zeros if None) plus its group's wd · p."""
        pieces = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("MFAC does not support sparse gradients; use dense embedding gradients")
                grad = torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.float()
                if group["weight_decay"] != 0:
                    grad = grad.add(p.float(), alpha=group["weight_decay"])
                pieces.append(grad.reshape(-1))
        return torch.cat(pieces)

    def _window_state(self, grad: Tensor) -> dict:
        """The optimizer's one state (kept under the first parameter, as torch.optim.LBFGS does), made on first use."""
        state = self.state[self._params()[0]]
        if "window" not in state:
            first = self.param_groups[0]
            m = first["num_grads"]
            state["step"] = torch.tensor(0, dtype=torch.int64)
            state["skipped_steps"] = torch.tensor(0, dtype=torch.int64)
            state["window"] = torch.zeros(m, grad.numel(), dtype=GRAD_DTYPES[first["grad_dtype"]], device=grad.device)
            state["gram"] = torch.zeros(m, m, dtype=torch.float64, device=grad.device)
        return state

    def _gradient_window(self, state: dict) -> GradientWindow:
        damp = self.param_groups[0]["damp"]
        if self._window is None or self._window.window is not state["window"] or self._window.gram is not state["gram"]:
            self._window = GradientWindow(state["window"], state["gram"], damp)
        self._window.damp = damp
        return self._window

    def _skip_nonfinite(self, state: dict) -> None:
        state["skipped_steps"] += 1
        if not self._warned_nonfinite:
            warnings.warn("MFAC: gradient contains NaN or Inf; step skipped (window and parameters unchanged)")
            self._warned_nonfinite = True

    def _apply(self, direction: Tensor, state: dict) -> None:
        """Per group: optional momentum v ← μv + (1 − μ)u, then p ← p − lr · v (or u)."""
        if any(group["momentum"] > 0 for group in self.param_groups):
            buffer = state.setdefault("momentum_buffer", torch.zeros_like(direction))
        offset = 0
        for group in self.param_groups:
            size = sum(p.numel() for p in group["params"])
            update = direction[offset:offset + size]
            if group["momentum"] > 0:
                velocity = buffer[offset:offset + size]
                velocity.mul_(group["momentum"]).add_(update, alpha=1 - group["momentum"])
                update = velocity
            self._update_params(group, update)
            offset += size

    @staticmethod
    def _update_params(group: dict, update: Tensor) -> None:
        offset = 0
        for p in group["params"]:
            n = p.numel()
            p.add_(update[offset:offset + n].view_as(p).to(p.dtype), alpha=-group["lr"])
            offset += n
