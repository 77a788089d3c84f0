"""Lower bound (VoCo-LLaMA's definition): the upper-bound model evaluated under the voco mask with
its untrained voco token, i.e. compression without compression training."""

from .registry import Method, register, upper_bound


def _load(path, budget, options):
    upper_bound(path)  # refuses a compressed checkpoint with a clear message
    from .registry import load_checkpoint

    return load_checkpoint(path, compression="voco", num_voco=budget or 1)


METHOD = register(Method(
    name="lower", kind="bound", tables=("1",),
    paper="Ye et al. 2025, VoCo-LLaMA: Towards Vision Compression with Large Language Models",
    summary="the upper-bound model under the voco mask, voco untrained",
    load=_load,
))
