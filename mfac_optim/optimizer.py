"""`MFAC`, the torch.optim plumbing: param groups and their settings (declared in config.py), the state (kept as
tensors in `self.state`, its only owner, so state_dict() round-trips it), flattening the gradients, momentum and
the parameter update. A step reads as gather (the flat gradient), precondition (the window), write (the update).
The window (window.py) works over the state dicts it is handed, with its storage and its m × m system; it is made
at the first step, or from the state after load_state_dict. Offsets are the layout's (layout.py); sharding across
processes is in distributed.py.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import huge_pages
from .config import MFACConfig, check_group, check_window_settings, defaults, keyword_signature, unknown_settings
from .distributed import (DirectionGather, OwnShard, check_shard_position, fsdp_group, fsdp_sum, local_shard,
                          shard_entry_name, shard_position, sum_over_processes, window_shard)
from .layout import Layout
from .memory import optimizer_state_bytes
from .phases import phase
from .window import GradientWindow, WindowSettings

# The optimizer's own counter, beside the window's: the host reads it, so it stays on the CPU, as torch.optim keeps
# "step" (and so do the window's HOST_KEYS).
COUNTERS = ("skipped_steps",)


class MFAC(Optimizer):
    """M-FAC with a window of the last `num_grads` gradients over the parameters of all groups that require grad
    (frozen ones, such as an adapter's base model, are left out, as torch.optim leaves them; the set is fixed when
    the window is made, at the first step).

    Args:
        params: tensors or param-group dicts. `lr`, `weight_decay` and `momentum` may differ per group;
            `num_grads`, `damp`, `grad_dtype`, `density` and `shard` describe the one shared window and must not.
        lr: learning rate, read from the group at every step (LR schedulers work).
        num_grads: m, the number of gradients in the window. Besides the window, m costs 16·m² bytes of float64
            state (the Gram matrix and its Cholesky factor) and O(m²) work per step (algebra.py).
        damp: λ in F = λI + (1/m) GᵀG.
        momentum: μ of the exponential average v ← μv + (1 − μ)u of the directions (0 disables it).
        weight_decay: coupled L2: g ← g + weight_decay · p before g enters the window.
        grad_dtype: storage dtype of the window ("float32", "bfloat16", "float16", "float64" or the torch dtype).
            With a low-precision window the rounded gradient is the one preconditioned, so window and direction
            agree. The step's algebra is float64 for float64 parameters, else fp32.
        density: the fraction of each error-fed gradient's entries the window keeps (top-k in each block of 32,768
            coordinates, with error feedback; compressed.py). 1.0 keeps the whole gradient (dense and row-sparse
            storage, no error buffer).
        shard: with an initialised default process group (torchrun, accelerate), each rank keeps 1/world_size of
            every parameter's rows in its window; the dot products are all-reduced and the direction all-gathered,
            so every rank takes the same step as one unsharded optimizer. Ranks must see the same gradients (as
            under DDP). Without a process group this changes nothing. State dicts are per rank.
    """

    def __init__(self, params: Iterable, **settings: Any) -> None:
        # The settings and their defaults are MFACConfig's (config.py); the signature below spells them out.
        unknown_settings(settings, "MFAC")
        config = MFACConfig(**settings)
        refuse_zero_redundancy()
        self._start_working_objects()
        super().__init__(params, config.as_dict())

    def _start_working_objects(self) -> None:
        """What the optimizer keeps besides its state, all of it made again from the state when needed: a copy
        (deepcopy, pickle, torch.save of the optimizer) starts with none of it."""
        self._warned_nonfinite = False
        self._window: Optional[GradientWindow] = None  # made at the first step, or from the state after loading
        # The flat gradient, rewritten at every step: a fresh allocation of d floats costs page faults at every step
        # on the CPU (at bert-mini's size, once a 6 GiB window is allocated, 60 ms).
        self._gradient: Optional[Tensor] = None
        self._gather = DirectionGather()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        check_group(self.param_groups[-1])
        check_window_settings(self.param_groups)
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(f"MFAC needs all parameters on one device, got {sorted(map(str, devices))}")

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim, hooks included, except that state tensors keep their dtypes: torch would cast the float64
        Gram matrix, a bf16 window and the fp32 momentum to each parameter's dtype (a bf16 window cast to fp32
        would also take twice its memory while loading). The state is taken after every pre-hook, which may
        replace it, and put in place before every post-hook, which sees it."""
        loaded: dict = {}

        def take_state(optimizer: Optimizer, hooked: dict) -> dict:
            loaded.update(hooked)
            return {**hooked, "state": {}}

        def put_state(optimizer: Optimizer) -> None:
            self._put_loaded_state(loaded)

        last_pre_hook = self.register_load_state_dict_pre_hook(take_state)
        first_post_hook = self.register_load_state_dict_post_hook(put_state, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            last_pre_hook.remove()
            first_post_hook.remove()

    def state_dict(self) -> dict:
        """As torch.optim's, with an entry for every trained parameter. A process that keeps a shard of the window
        (`shard=True`, or FSDP2) names its entries with its shard (`window@shard1of2`): a checkpoint of every
        process's state (DCP's) then keeps them apart, and each process loads its own."""
        saved = super().state_dict()
        # Every parameter the window covers has an entry, empty where the window keeps nothing under it (as AdamW
        # keeps state for each): DCP's set_state_dict refuses a state without one for each trained parameter.
        index = {id(p): number for number, p in enumerate(p for group in self.param_groups for p in group["params"])}
        for param in self._params():
            saved["state"].setdefault(index[id(param)], {})
        rank, world_size = self.window_shard()
        if world_size > 1:
            saved["state"] = {index: {shard_entry_name(key, rank, world_size): value for key, value in entries.items()}
                              for index, entries in saved["state"].items()}
        return saved

    def window_shard(self) -> tuple[int, int]:
        """(rank, number) of the window shard this process keeps (its part of a `shard=True` window, or of the
        FSDP2 shards); (0, 1) for a whole window."""
        return window_shard(self._params(), self.param_groups[0]["shard"]) if self._params() else (0, 1)

    def _put_loaded_state(self, state_dict: dict) -> None:
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        own = OwnShard(*self.window_shard())
        for index, param in zip(saved_ids, [p for group in self.param_groups for p in group["params"]]):
            if index in state_dict["state"]:
                entries = own.entries(state_dict["state"][index])
                self.state[param] = {key: loaded_copy(key, value, param.device) for key, value in entries.items()}
        own.check_found()
        self._window = None  # made again from the loaded state at the next step
        if self._params() and self._params()[0] in self.state and GradientWindow.saved_in(self._shared_state()):
            GradientWindow.upgrade_saved(self._shared_state())
            check_shard_position(self._shared_state(), self._layout())

    def __setstate__(self, state: dict) -> None:
        """Param groups saved before a setting existed get its default (torch.optim's place for upgrades); a copy
        of the optimizer starts its working objects afresh."""
        super().__setstate__(state)
        self._start_working_objects()
        for group in self.param_groups:
            for key, default in defaults().items():
                group.setdefault(key, default)

    def memory_bytes(self, with_buffers: bool = False) -> int:
        """Bytes of state this optimizer holds in this process (its shard of the window, the Gram matrix, momentum,
        row-sparse parts); `with_buffers` adds the scratch it keeps between steps (the flat gradient, the window's
        working buffers): all it holds, what the memory bound bounds."""
        held = optimizer_state_bytes(self)
        if with_buffers:
            held += (self._window.buffer_bytes() if self._window is not None else 0) + \
                (self._gradient.numel() * self._gradient.element_size() if self._gradient is not None else 0)
        return held

    def window_bytes(self) -> int:
        """Bytes of the window's stored slots in this process (0 before the first step): what each of a step's
        two passes over the window reads."""
        return self._window.stored_bytes() if self._window is not None else 0

    @torch.no_grad()
    def stored_gradients(self) -> Tensor:
        """The window as float32 rows over the windowed parameters in flat order (those of all groups that require
        grad, flattened and concatenated): row j is slot j, and the gradient stored by step t (1-based, skipped
        steps not counted) is in slot (t − 1) mod num_grads. A sharded process fills its own columns, the others
        stay zero."""
        if not GradientWindow.saved_in(self._shared_state()):
            total = sum(p.numel() for p in self._local_params())
            return torch.zeros(self.param_groups[0]["num_grads"], total, device=self._params()[0].device)
        return self._current_window().stored_rows()

    # torch.compile(optimizer.step) runs the step as it is: its fused kernels work on the data of real tensors, which
    # compilation's tracing does not have, and the step's time is in passes over the window that compiling the
    # Python around them would not shorten.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Performs one M-FAC step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not any(p.grad is not None for p in self._params()):  # nothing to learn from: nothing changes
            return loss
        with phase("gradient"):
            grad = self._flat_gradient()
        finite, stores = self._gradient_checks(grad)
        if not finite:
            self._skip_nonfinite()
            return loss
        if not stores:
            return loss
        window = self._current_window(grad)
        direction = window.insert_and_precondition(grad)
        with phase("update"):
            self._write_update(window.layout, direction)
        return loss

    def _gradient_checks(self, grad: Tensor) -> tuple[bool, bool]:
        """(whether the gradient is finite, whether it is stored). A window is made from the first step whose
        gradients have a non-zero entry: zero ones could not tell which rows are used, and would store nothing the
        steps see but weight decay (DCP's get_state_dict and set_state_dict take a step on zero gradients to make a
        fresh optimizer's state: it allocates no window). Under FSDP2 each process sees its shards alone, and all
        must decide alike: the two answers are agreed on by one all-reduce of two numbers."""
        # A sum is finite whenever all terms are, unless it overflows: only then is the full check needed. On a GPU
        # this is a host synchronisation the step needs: skipping it or not is the host's decision.
        finite = bool(torch.isfinite(grad.sum())) or bool(torch.isfinite(grad).all())
        made = self._window is not None or GradientWindow.saved_in(self.state.get(self._params()[0], {}))
        # The gradients themselves, before weight decay adds wd · p (DCP's zero step may come with weight decay).
        stores = made or any(bool(local_shard(p.grad).any()) for p in self._params() if p.grad is not None)
        group = fsdp_group(self._params())
        if group is not None:
            flags = torch.tensor([not finite, stores], dtype=torch.float32, device=grad.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=group)
            finite, stores = not bool(flags[0]), bool(flags[1])
        return finite, stores

    def _params(self) -> list[Tensor]:
        """The parameters the window covers, in flat order: those of all groups that require grad. A frozen one
        (an adapter's base model) never has a gradient; torch.optim's optimizers skip it too."""
        return [p for group in self.param_groups for p in trained(group)]

    def _shared_state(self) -> dict:
        """The state of the one window (kept under the first parameter, as torch.optim.LBFGS does)."""
        return self.state[self._params()[0]]

    def _precision(self) -> torch.dtype:
        """The dtype of the step's algebra, as torch.optim keeps state in the parameters' dtype: float64 for float64
        parameters, else fp32 (16-bit parameters get an fp32 step)."""
        return torch.float64 if all(p.dtype == torch.float64 for p in self._params()) else torch.float32

    def _flat_gradient(self) -> Tensor:
        """g over all groups in order: each parameter's gradient plus its group's wd · p; zeros for a parameter
        without a gradient this step (no weight decay either: torch.optim leaves such a parameter alone), so that
        the window holds what this step saw and later steps stay exact."""
        pieces, precision = [], self._precision()
        for group in self.param_groups:
            for p in trained(group):
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("MFAC does not support sparse gradients; use dense embedding gradients")
                shard = local_shard(p)
                grad = torch.zeros_like(shard, dtype=precision) if p.grad is None else \
                    local_shard(p.grad).to(precision)
                if group["weight_decay"] != 0 and p.grad is not None:
                    grad = grad.add(shard.to(precision), alpha=group["weight_decay"])
                pieces.append(grad.reshape(-1))
        size = sum(piece.numel() for piece in pieces)
        if self._gradient is None or self._gradient.numel() != size or self._gradient.device != pieces[0].device \
                or self._gradient.dtype != precision:
            self._gradient = torch.empty(size, dtype=precision, device=pieces[0].device)
        return torch.cat(pieces, out=self._gradient)

    def _current_window(self, first_gradient: Optional[Tensor] = None) -> GradientWindow:
        """The window, following the param groups' settings at this step: made once, over the state when there is
        one (after load_state_dict), else allocated for `first_gradient`."""
        check_window_settings(self.param_groups)
        settings = WindowSettings.of(self.param_groups[0], self._precision())
        if self._window is not None:
            if self._window.layout.shapes != tuple(p.shape for p in self._local_params()):
                self._take_new_parameters(self._layout())
            self._window.follow(settings, *shard_position(settings.shard))
            return self._window
        layout, params = self._layout(), self._params()
        shared, param_states = self.state[params[0]], [self.state[p] for p in params]
        sum_shards = sum_over_processes if layout.world_size > 1 else fsdp_sum(params)
        if GradientWindow.saved_in(shared):
            self._window = GradientWindow.from_state(layout, settings, shared, param_states, sum_shards)
        else:
            self._window = GradientWindow.allocate(layout, settings, first_gradient, shared, param_states, sum_shards)
            shared.setdefault("skipped_steps", torch.tensor(0, dtype=torch.int64))
        return self._window

    def _take_new_parameters(self, layout: Layout) -> None:
        """Parameters of a param group added after the window was made join it, and the momentum, with no history.
        Any other change of the parameters that require grad is refused."""
        made = self._window.layout.shapes
        if layout.shapes[:len(made)] != made:
            raise ValueError("MFAC: the parameters that require grad changed since the window was made; the window "
                             "covers a fixed set of parameters, to which add_param_group may add (make a new "
                             "optimizer for another set)")
        self._window.take_new_parameters(layout)
        shared = self._shared_state()
        if "momentum_buffer" in shared:
            velocity = shared["momentum_buffer"]
            shared["momentum_buffer"] = torch.cat([velocity, velocity.new_zeros(layout.local_size - velocity.numel())])

    def _layout(self) -> Layout:
        """This process's layout of the parameters that require grad (the window decides its row-sparse blocks):
        over their local shards when FSDP2 has sharded them (then the window is this process's alone: each keeps
        the window of its own shards and updates them, and only the dot products are summed)."""
        shard = self.param_groups[0]["shard"]
        if shard and fsdp_group(self._params()) is not None:
            raise ValueError("Invalid shard: True (FSDP2 has sharded the parameters already, and each process keeps "
                             "the window of its own shards; leave shard at False)")
        rank, world_size = shard_position(shard)
        return Layout(tuple(p.shape for p in self._local_params()), rank, world_size)

    def _local_params(self) -> list[Tensor]:
        """The parts of the parameters this process holds: their FSDP2 shards, or the parameters themselves."""
        return [local_shard(p) for p in self._params()]

    def _skip_nonfinite(self) -> None:
        # Counted under the first parameter, where the window state will be made: before the first stored gradient
        # this is the only entry there, and state_dict() carries it like any other.
        state = self._shared_state()
        state["skipped_steps"] = state.get("skipped_steps", torch.tensor(0, dtype=torch.int64)) + 1
        if not self._warned_nonfinite:
            warnings.warn("MFAC: gradient contains NaN or Inf; step skipped (window and parameters unchanged)")
            self._warned_nonfinite = True

    def _write_update(self, layout: Layout, direction: Tensor) -> None:
        """The parameters take the step: with momentum, gathered from every process's columns when sharded."""
        update = self._with_momentum(layout, direction)
        if layout.world_size > 1:
            update = self._gather(layout, update)
        self._update_params(layout, update)

    def _with_momentum(self, layout: Layout, direction: Tensor) -> Tensor:
        """This rank's update: per group with momentum μ > 0, v ← μv + (1 − μ)u (kept for this rank's blocks),
        written over u; u itself elsewhere. A parameter without a gradient this step keeps its velocity (it is not
        moved either)."""
        momenta = [group["momentum"] if p.grad is not None else 0.0
                   for group in self.param_groups for p in trained(group)]
        if not any(group["momentum"] for group in self.param_groups):
            return direction
        buffer = self._shared_state().setdefault("momentum_buffer", torch.zeros_like(direction))
        for block in layout.blocks:
            momentum = momenta[block.index]
            if momentum > 0:
                velocity = buffer[block.local]
                velocity.mul_(momentum).add_(direction[block.local], alpha=1 - momentum)
                direction[block.local] = velocity
        return direction

    def _update_params(self, layout: Layout, update: Tensor) -> None:
        """p ← p − lr · update, with each group's lr (a number or a tensor), for the parameters that have a
        gradient this step (torch.optim moves no other): one multi-tensor add per group, as torch.optim's foreach
        implementations do, rather than a kernel launch per parameter."""
        pieces = [update[flat] for _, flat in layout.param_slices()]
        start = 0
        for group in self.param_groups:
            params = trained(group)
            moved = [(local_shard(p), piece.view_as(local_shard(p)).to(p.dtype))
                     for piece, p in zip(pieces[start:start + len(params)], params) if p.grad is not None]
            if moved:
                lr = group["lr"]
                torch._foreach_add_([p for p, _ in moved], [step for _, step in moved],
                                    alpha=-(lr.item() if torch.is_tensor(lr) else lr))
            start += len(params)


def refuse_zero_redundancy() -> None:
    """ZeroRedundancyOptimizer gives each rank's optimizer that rank's parameters alone: M-FAC there would
    precondition each rank's share with its own window, a different optimizer from M-FAC over the whole model.
    `shard=True` splits the one window instead. (ZeRO builds its local optimizer from its own methods: their frame
    is the only mark it leaves.)"""
    if not torch.distributed.is_available():
        return
    from torch.distributed.optim import ZeroRedundancyOptimizer

    frame = inspect.currentframe()
    while frame is not None:
        if isinstance(frame.f_locals.get("self"), ZeroRedundancyOptimizer):
            raise ValueError("MFAC under ZeroRedundancyOptimizer would precondition each rank's parameters with a "
                             "window of their own (not M-FAC over the model): use MFAC(..., shard=True), which "
                             "splits one window across the ranks, instead")
        frame = frame.f_back


def loaded_copy(key: str, value: Tensor, device: torch.device) -> Tensor:
    """A loaded state entry, copied: on the CPU where the host reads it at every step, else on the parameter's
    device; contiguous, as the window's passes read it, and on huge pages where the window's own are."""
    if key in COUNTERS or key in GradientWindow.HOST_KEYS:
        return value.clone(memory_format=torch.contiguous_format)
    return huge_pages.copy(value, device)


def trained(group: dict) -> list[Tensor]:
    """A param group's parameters that require grad."""
    return [p for p in group["params"] if p.requires_grad]


MFAC.__init__.__signature__ = keyword_signature(MFAC.__init__, leading=2)
