"""htc-vlm: Hybrid Token Compression for Vision-Language Models."""

from .cache import VisualCache
from .configuration import HTCConfig
from .errors import HTCError
from .modeling import HTCForConditionalGeneration, HTCModel

__version__ = "0.1.0"
__all__ = ["HTCConfig", "HTCError", "HTCForConditionalGeneration", "HTCModel", "VisualCache"]
