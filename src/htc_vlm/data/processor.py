"""The image processor saved with every model: how its tower was fed, read back by every path.

A model folder holds ``preprocessor_config.json``, a transformers image processor file (the one
llava-hf checkpoints ship), and :class:`ImageProcessing` turns it into pixels with transformers'
``LlavaImageProcessorPil`` (PIL only, no torchvision). Four geometries (``aspect``):

- ``exact``: the image must already have the tower's size; another size is an error (the scenes);
- ``resize``: squashed to ``size`` x ``size`` (bicubic), aspect ratio not kept;
- ``crop``: shortest edge resized to ``size``, then a centre crop (llava-hf's processor);
- ``pad``: padded to a square with the mean colour, then resized (LLaVA-1.5's ``image_aspect_ratio=pad``).

Then ``(x / 255 - mean) / std``. A model folder without the file (written before it existed) is
read as ``exact`` with its ``config.image_norm``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..errors import HTCError
from ..io import atomic_write_bytes
from .images import IMAGE_NORMS, norm_stats

PROCESSOR_FILE = "preprocessor_config.json"
ASPECTS = ("exact", "resize", "crop", "pad")
# Processor types whose files we read: the same keys and the same operations (CLIP's has no padding).
KNOWN_TYPES = ("CLIPImageProcessor", "CLIPFeatureExtractor", "CLIPImageProcessorPil", "CLIPImageProcessorFast",
               "LlavaImageProcessor", "LlavaImageProcessorPil", "LlavaImageProcessorFast")
BICUBIC = 3


def _square(value, key: str) -> int:
    """The side of a ``size`` / ``crop_size`` entry (an int or a dict); a non-square one is refused."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if value.get("height") == value.get("width") and value.get("height"):
            return int(value["height"])
    raise HTCError(f"{PROCESSOR_FILE}: {key}={value!r} is not a square size")


@dataclass(frozen=True)
class ImageProcessing:
    """The geometry and normalisation of a model's images (see the module docstring)."""

    size: int
    aspect: str = "exact"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        if self.aspect not in ASPECTS:
            raise HTCError(f"unknown image aspect {self.aspect!r}; known: {', '.join(ASPECTS)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise HTCError(f"image mean / std need 3 values each (std > 0), got {self.mean} / {self.std}")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        object.__setattr__(self, "_proc", self._transformers())

    @classmethod
    def named(cls, size: int, norm: str = "half", aspect: str = "exact") -> "ImageProcessing":
        """From a normalisation name of :data:`~htc_vlm.data.images.IMAGE_NORMS` (unknown: an error)."""
        mean, std = norm_stats(norm)
        return cls(size, aspect, mean, std)

    @property
    def norm(self) -> str | None:
        """The name of the normalisation, when it is a known one (``config.image_norm``)."""
        return next((n for n, (m, s) in IMAGE_NORMS.items() if (m, s) == (self.mean, self.std)), None)

    @property
    def exact(self) -> bool:
        return self.aspect == "exact"

    def squashing(self) -> "ImageProcessing":
        """This processing, but an image of another size is resized instead of refused (``--resize``)."""
        return ImageProcessing(self.size, "resize", self.mean, self.std) if self.exact else self

    # ------------------------------------------------------------------ the file

    def to_dict(self) -> dict:
        """The ``preprocessor_config.json`` of a transformers ``LlavaImageProcessor`` doing the same."""
        s = self.size
        return {
            "image_processor_type": "LlavaImageProcessor",
            "do_convert_rgb": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(self.mean), "image_std": list(self.std), "resample": BICUBIC,
            "do_pad": self.aspect == "pad",
            "do_resize": not self.exact,
            "size": {"height": s, "width": s} if self.aspect == "resize" else {"shortest_edge": s},
            "do_center_crop": self.aspect in ("crop", "pad"),
            "crop_size": {"height": s, "width": s},
        }

    @classmethod
    def from_dict(cls, d: dict, size: int, where: str = PROCESSOR_FILE) -> "ImageProcessing":
        """Read a transformers image processor dict for a tower of ``size``; what we cannot do the
        same way (another resampling, a non-square output, a size the tower does not take) is refused."""
        kind = d.get("image_processor_type") or d.get("feature_extractor_type", "CLIPImageProcessor")
        if kind not in KNOWN_TYPES:
            raise HTCError(f"{where}: image_processor_type {kind!r} is not supported; known: {', '.join(KNOWN_TYPES)}")
        if d.get("do_resize", True) and int(d.get("resample", BICUBIC)) != BICUBIC:
            raise HTCError(f"{where}: resample={d.get('resample')} is not supported (LLaVA uses 3, bicubic)")
        if not d.get("do_rescale", True) or abs(float(d.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
            raise HTCError(f"{where}: pixels must be rescaled by 1/255 (do_rescale, rescale_factor)")
        resize, crop, pad = d.get("do_resize", True), d.get("do_center_crop", False), d.get("do_pad", False)
        if pad and not resize:
            raise HTCError(f"{where}: do_pad without do_resize gives images of any size")
        if not resize and crop:
            raise HTCError(f"{where}: do_center_crop without do_resize is not supported")
        out = None
        if resize:
            target = d.get("size", {"shortest_edge": size})
            out = _square(target, "size")
            squash = isinstance(target, dict) and "shortest_edge" not in target
            if crop:
                out = _square(d.get("crop_size", out), "crop_size")
            elif not squash:
                raise HTCError(f"{where}: resizing the shortest edge without a centre crop gives non-square images")
            aspect = "pad" if pad else ("crop" if crop else "resize")
        else:
            aspect = "exact"
        if out is not None and out != size:
            raise HTCError(f"{where}: gives {out}x{out} images, but the vision tower takes {size}x{size}")
        mean, std = d.get("image_mean", (0.5,) * 3), d.get("image_std", (0.5,) * 3)
        if not d.get("do_normalize", True):
            mean, std = (0.0,) * 3, (1.0,) * 3
        mean, std = ([mean] * 3 if isinstance(mean, (int, float)) else mean), ([std] * 3 if isinstance(std, (int, float)) else std)
        return cls(size, aspect, tuple(mean), tuple(std))

    @classmethod
    def load(cls, folder: str | Path, size: int) -> "ImageProcessing | None":
        """The processing saved in ``folder``, or None when the folder has no processor file."""
        path = Path(folder) / PROCESSOR_FILE
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTCError(f"cannot read {path}: {e}") from e
        if not isinstance(d, dict):
            raise HTCError(f"{path} is not a JSON object")
        return cls.from_dict(d, size, str(path))

    def save(self, folder: str | Path) -> None:
        atomic_write_bytes(Path(folder) / PROCESSOR_FILE, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    # ------------------------------------------------------------------ images

    def _transformers(self):
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        d = self.to_dict()
        d.pop("image_processor_type")
        return LlavaImageProcessorPil(**d)

    def check(self, img: Image.Image, name: str) -> Image.Image:
        """``img`` itself; with ``exact``, another size than the tower's is an error naming ``name``."""
        if self.exact and img.size != (self.size, self.size):
            raise HTCError(f"{name} is {img.size[0]}x{img.size[1]} but {self.size}x{self.size} is expected "
                           f"(the model's {PROCESSOR_FILE} does not resize)")
        return img

    def check_dims(self, dims: tuple[int, int], name: str) -> None:
        if self.exact and tuple(dims) != (self.size, self.size):
            raise HTCError(f"{name} is {dims[0]}x{dims[1]} but {self.size}x{self.size} is expected")

    def pixels(self, imgs: list[Image.Image]) -> torch.Tensor:
        """(B, 3, size, size) float32 pixel values of RGB images."""
        for i, img in enumerate(imgs):
            self.check(img, f"image {i}")
        return self._proc(imgs, return_tensors="pt")["pixel_values"]

    def to_unit(self, pix: torch.Tensor) -> torch.Tensor:
        """``pixels`` back in [-1, 1] (the discrete tokenizer's input), the same geometry."""
        if self.mean == (0.5,) * 3 and self.std == (0.5,) * 3:
            return pix
        mean, std = torch.tensor(self.mean)[:, None, None], torch.tensor(self.std)[:, None, None]
        return (pix * std + mean) * 2 - 1
