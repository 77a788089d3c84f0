"""htc-vlm: Hybrid Token Compression for Vision-Language Models."""

__version__ = "0.1.0"
