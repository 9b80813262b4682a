"""A folder of PNG/JPEG files with one sub-folder per class (torchvision's ImageFolder layout).

``root/<class>/**/<file>.png|.jpg|.jpeg`` (extensions in any case). Class sub-folders sorted by
name get labels 0..K-1 (``class_names`` lists them in label order). Hidden files and folders
(names starting with '.') and files with other extensions are ignored. The images are grey
(N, 1, R, R) when every readable image is grey (Pillow modes 1, L, LA, I;16, ...), otherwise
RGB (N, 3, R, R), grey images repeated to three channels; alpha is dropped. Each image is
resized bilinearly to the resolution on its own, so the sizes may differ.

Problems found: files with an image extension that Pillow cannot decode (corrupt, truncated,
not an image) and class folders left without a readable image. ``on_bad="fail"`` raises
``BadImagesError`` naming them; ``on_bad="skip"`` leaves them out and returns them as
``{"file", "reason"}`` entries. A skipped empty class keeps its label number (so labels stay
the sorted-name index) and has no images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gan.data.arrays import ImageSet
from gan.data.common import (
    EMPTY_CLASS,
    IMAGE_EXTENSIONS,
    BadImagesError,
    bad_images_error,
    check_on_bad,
    decode_image,
    is_hidden,
    resize_one,
    stack_images,
)

__all__ = ["BadImagesError", "class_names", "image_files", "read_image_folder"]


def class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p))


def class_names(root: str | Path) -> list[str]:
    """Class names in label order: ``class_names(root)[label]``."""
    return [p.name for p in class_folders(Path(root))]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(path) and path.is_file()


def image_files(folder: Path) -> list[Path]:
    """Image-extension files under ``folder`` (any depth, no hidden parts), sorted by path."""
    return sorted(
        p
        for p in folder.rglob("*")
        if is_image_file(p) and not any(part[0] == "." for part in p.relative_to(folder).parts)
    )


def has_class_images(root: Path, limit: int = 10_000) -> bool:
    """True when some class sub-folder holds an image-extension file (looks at ``limit`` paths)."""
    for folder in class_folders(root):
        for i, p in enumerate(folder.rglob("*")):
            if is_image_file(p):
                return True
            if i >= limit:
                break
    return False


def read_image_folder(
    root: str | Path, resolution: int, *, on_bad: str = "fail"
) -> tuple[ImageSet, list[dict[str, str]]]:
    """Read ``root`` at ``resolution``; returns the images and the skipped files with reasons."""
    check_on_bad(on_bad)
    root = Path(root)
    folders = class_folders(root)
    if not folders:
        loose = [p for p in root.iterdir() if is_image_file(p)]
        hint = f"; found {len(loose)} image file(s) directly in it" if loose else ""
        raise ValueError(
            f"{root}: no class sub-folders: expected one sub-folder per class, "
            f"e.g. {root / 'cat' / '0001.png'}{hint}"
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    problems: list[dict[str, str]] = []
    for label, folder in enumerate(folders):
        files = image_files(folder)
        loaded = 0
        for path in files:
            try:
                pixels = decode_image(path)
            except MemoryError:
                raise
            except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
                problems.append({"file": str(path), "reason": f"{type(exc).__name__}: {exc}"})
                continue
            images.append(resize_one(pixels, resolution))
            labels.append(label)
            loaded += 1
        if not loaded:
            reason = (
                f"{EMPTY_CLASS}: none of its {len(files)} image file(s) could be read"
                if files
                else f"{EMPTY_CLASS}: no {'/'.join(IMAGE_EXTENSIONS)} files"
            )
            problems.append({"file": str(folder), "reason": reason})
    if problems and on_bad == "fail":
        raise bad_images_error(root, problems)
    if not images:
        raise ValueError(f"{root}: no readable images in any class folder")
    return ImageSet(stack_images(images), np.asarray(labels, dtype=np.int64)), problems
