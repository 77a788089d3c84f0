"""Upper bound: no compression, the text attends to every patch token (LLaVA-1.5)."""

from .registry import Method, register, upper_bound

METHOD = register(Method(
    name="upper", kind="bound", tables=("1", "2"),
    paper="Liu et al. 2024, Improved Baselines with Visual Instruction Tuning (LLaVA-1.5)",
    summary="all patch tokens, no compression",
    load=lambda path, budget, options: upper_bound(path),
))
