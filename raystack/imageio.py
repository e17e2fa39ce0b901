"""Image folders in the format users give (`metadata.jsonl` with `file_name`, `text`), read strictly.

Every failure names the file: a truncated PNG, a caption line that is not JSON, a missing file.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .outputs import shown
from .atomic import atomic_dir, atomic_write_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_METADATA_BYTES = 64 << 20


@dataclass
class ImageFolder:
    root: Path
    files: list[str]
    images: np.ndarray  # uint8 N x H x W x 3
    captions: list[str | None]


#: Largest image read (pixels): a 64-megapixel photo; above it a file is refused before it is decoded, so a
#: small "decompression bomb" PNG cannot take the machine's memory.
MAX_PIXELS = 8192 * 8192


def read_image(path: Path, size: int | None = None) -> np.ndarray:
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise UserError(f"{shown(str(path))}: {w}x{h} pixels, above the {MAX_PIXELS // 1_000_000} megapixel bound; "
                                    "resize it first")
                im.load()
                im = _to_rgb(im, path)
                if size is not None and im.size != (size, size):
                    im = resize_and_crop(im, size)
                return np.asarray(im, dtype=np.uint8).copy()
    except Image.DecompressionBombError:
        raise UserError(f"{shown(str(path))}: above the {MAX_PIXELS // 1_000_000} megapixel bound; resize it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{shown(str(path))}: unreadable image ({str(e).splitlines()[0][:120]})") from None


def resize_and_crop(im, size: int):
    """The diffusers training examples' preprocessing: resize the short side to `size` (bicubic), then crop
    the centre to size x size. A 300x200 photo keeps its aspect instead of being squashed."""
    from PIL import Image

    w, h = im.size
    side = min(w, h)  # the centre square, in the image's own pixels, resized once (no huge intermediate)
    left, top = (w - side) / 2, (h - side) / 2
    return im.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))


def _to_rgb(im, path: Path):
    """8-bit RGB. 16-bit (and 32-bit integer) greyscale is scaled down, not clipped: PIL's own conversion
    clips every value above 255, which turns a 16-bit PNG white. Transparency (RGBA, LA, a palette or an
    image with a transparent colour) is composited on white, as image editors show it, not dropped to black."""
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.int64)
        top = 65535 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255
        a = np.clip(a, 0, top) * 255 // top
        return Image.fromarray(a.astype(np.uint8), mode="L").convert("RGB")
    if im.mode == "F":
        raise UserError(f"{shown(str(path))}: floating-point image ({im.mode}); save it as 8- or 16-bit PNG/JPEG")
    return im.convert("RGB")


def confined_file(root: Path, name, where: str) -> Path:
    """`root / name` for a `file_name` of metadata.jsonl, which must name a file inside `root`: no absolute
    path, no '..', no link that leads out of the folder."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise UserError(f"{where}: file_name must be a non-empty string")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise UserError(f"{where}: file_name {shown(name)} leads outside the folder; give a path inside it")
    p = root / rel
    real_root = Path(os.path.realpath(root))
    if real_root not in Path(os.path.realpath(p)).parents:
        raise UserError(f"{where}: file_name {shown(name)} is a link that leads outside the folder")
    return p


def read_image_folder(root: Path, flag: str = "--data", require_captions: bool = True,
                      size: int | None = None, check_only: bool = False) -> ImageFolder:
    """Every image decoded (8-bit RGB), at `size` x `size` (`resize_and_crop`) or as stored. `check_only`:
    a check before a run (every file and caption read); images of several sizes are then accepted, since
    the run resizes them."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{flag} {root}: no such folder")
    meta = root / "metadata.jsonl"
    captions: dict[str, str] = {}
    if meta.is_file():
        if meta.stat().st_size > MAX_METADATA_BYTES:
            raise UserError(f"{flag} {meta}: larger than {MAX_METADATA_BYTES >> 20} MiB")
        for ln, line in enumerate(meta.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{flag} {meta}:{ln}: not a JSON line") from None
            if not isinstance(row, dict) or "file_name" not in row:
                raise UserError(f"{flag} {meta}:{ln}: needs a \"file_name\" field")
            confined_file(root, row["file_name"], f"{flag} {meta}:{ln}")
            text = row.get("text")
            if require_captions and (not isinstance(text, str) or not text.strip()):
                raise UserError(f"{flag} {meta}:{ln}: no caption (\"text\") for {shown(row['file_name'])}")
            captions[str(row["file_name"])] = text if isinstance(text, str) else None
    elif require_captions:
        files = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise UserError(f"{flag} {root}: no images (expected PNG/JPEG files and a metadata.jsonl)")
        raise UserError(f"{flag} {root}: images without captions (no metadata.jsonl with file_name/text)")
    names = list(captions) if captions else sorted(p.name for p in root.iterdir()
                                                   if p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise UserError(f"{flag} {root}: no images")
    imgs = []
    for name in names:
        p = confined_file(root, name, f"{flag} {root}")
        if not p.is_file():
            raise UserError(f"{flag} {meta}: lists {shown(name)}, which does not exist")
        imgs.append(read_image(p, size))
    shapes = {im.shape for im in imgs}
    if len(shapes) > 1 and not check_only:
        raise UserError(f"{flag} {root}: images differ in size ({sorted(shapes)[:3]}); this command needs one size")
    return ImageFolder(root, names, np.stack(imgs) if len(shapes) == 1 else np.zeros((0, 1, 1, 3), np.uint8),
                       [captions.get(n) for n in names])


def to_model_tensor(images: np.ndarray):
    """uint8 NHWC -> float NCHW in [-1, 1], the range diffusers' VAE expects."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def from_model_tensor(x) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: Path, image: np.ndarray) -> None:
    atomic_write_bytes(Path(path), png_bytes(image))


def write_image_folder(dest: Path, images: np.ndarray, captions: list[str], overwrite: bool = False,
                       prefix: str = "img") -> int:
    """Atomically write PNGs + metadata.jsonl."""

    with atomic_dir(Path(dest), overwrite=overwrite) as tmp:
        lines = []
        for i, (im, cap) in enumerate(zip(images, captions)):
            name = f"{prefix}_{i:05d}.png"
            (tmp / name).write_bytes(png_bytes(im))
            lines.append(json.dumps({"file_name": name, "text": cap}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return len(images)
