"""Upper bound: no compression, the text attends to every patch token (LLaVA-1.5)."""

from .compression import Compression, register_compression
from .registry import Method, register, upper_bound


class Uncompressed(Compression):
    """``compression="none"``: the image block is the projected patches, and the text sees all of them."""

    name = "none"
    uncompressed = True
    uses_voco = False


register_compression(Uncompressed())
METHOD = register(Method(
    name="upper", kind="bound", tables=("1", "2"),
    paper="Liu et al. 2024, Improved Baselines with Visual Instruction Tuning (LLaVA-1.5)",
    summary="all patch tokens, no compression", label="upper bound (every patch token)",
    load=lambda path, budget, options: upper_bound(path),
))
