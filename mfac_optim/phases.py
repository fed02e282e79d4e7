"""The names under which a step's phases appear in torch.profiler (scripts/bench_mfac.py reads them)."""
from torch.profiler import record_function

PHASE_PREFIX = "mfac::"
# A step's phases, one after the other: together they are the step but for its bookkeeping.
PHASES = ("gradient", "store", "dots", "m×m", "combine", "update")
# Parts of a phase, marked within it: the compressed window's store is its error feedback and its top-k selection.
SUBPHASES = {"store": ("error feedback", "top-k")}


def phase(name: str) -> record_function:
    """A step phase (or a part of one) as a torch.profiler range: free when no profiler runs."""
    return record_function(PHASE_PREFIX + name)
