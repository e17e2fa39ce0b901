"""Image folders in the format users give (`metadata.jsonl` with `file_name`, `text`), read strictly.

Every failure names the file: a truncated PNG, a caption line that is not JSON, a missing file.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class ImageFolder:
    root: Path
    files: list[str]
    images: np.ndarray  # uint8 N x H x W x 3
    captions: list[str | None]


def read_image(path: Path, size: int | None = None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: unreadable image ({str(e).splitlines()[0][:120]})") from None


def read_image_folder(root: Path, flag: str = "--data", require_captions: bool = True,
                      size: int | None = None) -> ImageFolder:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{flag} {root}: no such folder")
    meta = root / "metadata.jsonl"
    captions: dict[str, str] = {}
    if meta.is_file():
        for ln, line in enumerate(meta.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{flag} {meta}:{ln}: not a JSON line") from None
            if not isinstance(row, dict) or "file_name" not in row:
                raise UserError(f"{flag} {meta}:{ln}: needs a \"file_name\" field")
            text = row.get("text")
            if require_captions and (not isinstance(text, str) or not text.strip()):
                raise UserError(f"{flag} {meta}:{ln}: no caption (\"text\") for {row['file_name']}")
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
        p = root / name
        if not p.is_file():
            raise UserError(f"{flag} {meta}: lists {name}, which does not exist")
        imgs.append(read_image(p, size))
    shapes = {im.shape for im in imgs}
    if len(shapes) > 1:
        raise UserError(f"{flag} {root}: images differ in size ({sorted(shapes)[:3]}); pass a --resolution")
    return ImageFolder(root, names, np.stack(imgs), [captions.get(n) for n in names])


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: Path, image: np.ndarray) -> None:
    from .atomic import atomic_write_bytes

    atomic_write_bytes(Path(path), png_bytes(image))


def write_image_folder(dest: Path, images: np.ndarray, captions: list[str], overwrite: bool = False,
                       prefix: str = "img") -> int:
    """Atomically write PNGs + metadata.jsonl."""
    from .atomic import atomic_dir

    with atomic_dir(Path(dest), overwrite=overwrite) as tmp:
        lines = []
        for i, (im, cap) in enumerate(zip(images, captions)):
            name = f"{prefix}_{i:05d}.png"
            (tmp / name).write_bytes(png_bytes(im))
            lines.append(json.dumps({"file_name": name, "text": cap}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return len(images)
