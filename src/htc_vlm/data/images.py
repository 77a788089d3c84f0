"""Reading images: one place that turns files into tensors and bad files into clear errors.

Grey-scale, palette and RGBA images are converted to RGB (alpha composited on white); an image
that cannot be decoded, or has another size than the model or tokenizer expects, is an
:class:`~htc_vlm.errors.HTCError` naming the file.
"""

from __future__ import annotations

import io
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import HTCError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")

# CLIP's normalisation (openai/clip-vit-large-patch14-336), used by the LLaVA-1.5 path
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


IMAGE_NORMS = {"half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # [0, 1] -> [-1, 1] (MGVQ, the tiny tower)
               "clip": (CLIP_MEAN, CLIP_STD)}


def norm_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the pixel normalisation ``name``; an unknown name is an error, never a default."""
    if name not in IMAGE_NORMS:
        raise HTCError(f"unknown image normalisation {name!r}; known: {', '.join(IMAGE_NORMS)}")
    return IMAGE_NORMS[name]


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with grey-scale and palette converted and alpha composited on white."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def _check_size(img: Image.Image, size: int | None, name: str) -> Image.Image:
    """``img``, or an HTCError naming it when ``size`` is given and it is another size. (Resizing,
    cropping and padding are the image processing's, data/processor.py.)"""
    if size is not None and img.size != (size, size):
        raise HTCError(f"{name} is {img.size[0]}x{img.size[1]} but {size}x{size} is expected")
    return img


@contextmanager
def _decoding(path: Path):
    """Turn every way an image file can fail to open into one HTCError naming it; an image over
    Pillow's ``MAX_IMAGE_PIXELS`` (a decompression bomb) is refused like an undecodable one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except HTCError:
        raise
    except FileNotFoundError as e:
        raise HTCError(f"image not found: {path}") from e
    except IsADirectoryError as e:
        raise HTCError(f"{path} is a folder, not an image") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise HTCError(f"image {path} is too large to decode safely: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise HTCError(f"cannot decode image {path}: {e}") from e


def _read_rgb(source, name: str, size: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """The image ``source()`` opens (a path or a fresh file object each call), as RGB, of ``size``
    when given. A PNG whose chunk checksums do not match (Pillow would decode it with wrong pixels) is
    refused; with ``max_pixels``, so is a larger image, from its header, before it is decoded."""
    with _decoding(Path(name)):
        with Image.open(source()) as im:
            if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
                raise HTCError(f"{name} is {im.size[0]}x{im.size[1]}, over the limit of {max_pixels} pixels")
            if im.format == "PNG":
                im.verify()  # every chunk's CRC; a verified image must be opened again to decode
        with Image.open(source()) as im:
            im.load()
            img = to_rgb(im)
    return _check_size(img, size, name)


def load_rgb(path: str | Path, size: int | None = None) -> Image.Image:
    """Open ``path`` as RGB. With ``size``: refuse another size."""
    return _read_rgb(lambda: path, str(path), size)


def decode_image(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """:func:`load_rgb` for bytes in memory (an upload): ``name`` is only used in errors. With
    ``max_pixels``, an image with more pixels is refused from its header, before it is decoded."""
    return _read_rgb(lambda: io.BytesIO(data), name, max_pixels=max_pixels)


def check_header(path: str | Path, processing=None) -> None:
    """Cheap check before a long job: ``path`` is an image file (its header decodes) that
    ``processing`` (an :class:`~htc_vlm.data.processor.ImageProcessing`) takes. Reads the header
    only, so a whole training set is checked in seconds; the pixels are checked by
    :func:`load_rgb` when the image is used."""
    path = Path(path)
    with _decoding(path):
        with Image.open(path) as im:
            dims = im.size
    if processing is not None:
        processing.check_dims(dims, str(path))


PARALLEL_FROM = 20_000  # images; fewer (the scenes: 2,500) are checked in this process


def _first_bad(args) -> tuple[int, str] | None:
    """(position, error) of the first image of a chunk that fails :func:`check_header`, or None."""
    root, names, start, processing = args
    for i, name in enumerate(names):
        try:
            check_header(image_under(root, name), processing)
        except HTCError as e:
            return start + i, str(e)
    return None


def first_bad_image(root: str | Path, names: list[str], processing=None, workers: int | None = None,
                    chunk: int = 2_000) -> tuple[int, str] | None:
    """(index in ``names``, error) of the first image below ``root`` that fails :func:`check_header`, or
    None. Large lists are checked by ``workers`` processes (default: every core): a LLaVA-665k-sized
    set (~400k images) would take minutes in one process."""
    jobs = [(root, names[i:i + chunk], i, processing) for i in range(0, len(names), chunk)]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1 or len(names) < PARALLEL_FROM:  # a pool costs more than it saves on small sets
        results = map(_first_bad, jobs)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:  # header reads only
            results = list(pool.map(_first_bad, jobs))
    return next((r for r in results if r is not None), None)


def image_under(root: str | Path, name: str) -> Path:
    """The file ``name`` (a question's or training record's ``image`` field) inside ``root``; an
    absolute path or one that leaves ``root`` (``..``, a symlink pointing out) is an error."""
    if not isinstance(name, str) or not name:
        raise HTCError(f"image field {name!r} is not a file name")
    root = Path(root)
    path = root / name
    if Path(name).is_absolute() or not path.resolve().is_relative_to(root.resolve()):
        raise HTCError(f"image {name!r} is outside the image folder {root}")
    return path


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
