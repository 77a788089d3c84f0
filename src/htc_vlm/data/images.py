"""Reading images: one place that turns files into tensors and bad files into clear errors.

Grey-scale, palette and RGBA images are converted to RGB (alpha composited on white); an image
that cannot be decoded, or has another size than the model or tokenizer expects, is an
:class:`~htc_vlm.errors.HTCError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import HTCError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")

# CLIP's normalisation (openai/clip-vit-large-patch14-336), used by the LLaVA-1.5 path
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with grey-scale and palette converted and alpha composited on white."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def fit(img: Image.Image, size: int | None, resize: bool, name: str) -> Image.Image:
    """Refuse another size than ``size`` by ``name``, or resize (bicubic) when ``resize``."""
    if size is not None and img.size != (size, size):
        if not resize:
            raise HTCError(f"{name} is {img.size[0]}x{img.size[1]} but {size}x{size} is expected")
        img = img.resize((size, size), Image.BICUBIC)
    return img


def load_rgb(path: str | Path, size: int | None = None, resize: bool = False) -> Image.Image:
    """Open ``path`` as RGB. With ``size``: refuse another size, or resize (bicubic) if ``resize``."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            img = to_rgb(im)
    except FileNotFoundError as e:
        raise HTCError(f"image not found: {path}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise HTCError(f"cannot decode image {path}: {e}") from e
    return fit(img, size, resize, str(path))


def to_tensor(img: Image.Image, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """(3, H, W) float; the default maps [0, 255] to [-1, 1] (what MGVQ and our tiny tower expect)."""
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise HTCError(f"image folder not found: {folder}")
    found = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise HTCError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files
