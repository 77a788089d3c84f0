"""Lower bound (VoCo-LLaMA's definition): the upper-bound model evaluated under the voco mask with
its untrained voco token, i.e. compression without compression training."""

from ..errors import HTCError
from .registry import Method, load_checkpoint, register, upper_bound


def _load(path, budget, options):
    if budget not in (None, 1):
        raise HTCError("the lower bound is defined for one voco token (Table 1); it takes no other budget")
    upper_bound(path)  # refuses a compressed checkpoint with a clear message
    return load_checkpoint(path, compression="voco")


METHOD = register(Method(
    name="lower", kind="bound", tables=("1",),
    paper="Ye et al. 2025, VoCo-LLaMA: Towards Vision Compression with Large Language Models",
    summary="the upper-bound model under the voco mask, voco untrained", label="lower bound (voco mask, untrained)",
    load=_load,
))
