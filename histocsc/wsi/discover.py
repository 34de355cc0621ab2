"""Find the slides named on a command line: files as given, folders searched for slide files.

One finder for every command (`tiles`, `infer`, ...). A folder contributes its whole-slide files
(`SLIDE_SUFFIXES`); a folder that holds none contributes its plain images (PNG / JPEG / BMP),
which then need `--slide-mpp`. With `recursive`, sub-folders are searched too (hidden ones are
skipped). Two slides with the same file stem would share one output folder: that is an error.
"""

from __future__ import annotations

from pathlib import Path

from histocsc.errors import SlideError, SlideNotFoundError

SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif"}
)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})


def _folder_slides(folder: Path) -> list[Path]:
    """A folder's slide files, else its plain images, sorted by name."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    slides = [p for p in files if p.suffix.lower() in SLIDE_SUFFIXES]
    return slides or [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]


def _folders(root: Path, recursive: bool) -> list[Path]:
    if not recursive:
        return [root]
    subs = sorted(p for p in root.rglob("*") if p.is_dir()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return [root, *subs]


def find_slides(inputs: list[Path], recursive: bool = False) -> list[Path]:
    """Slide files named directly, plus those found in named folders (see the module doc).

    Raises SlideError for a missing path, a folder without slides, or two slides whose output
    folders (their file stems) would clash."""
    found: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            inside = [p for d in _folders(item, recursive) for p in _folder_slides(d)]
            if not inside:
                known = ", ".join(sorted(SLIDE_SUFFIXES | IMAGE_SUFFIXES))
                where = "folder and its sub-folders hold" if recursive else "folder holds"
                hint = "" if recursive else " (--recursive searches sub-folders)"
                raise SlideError(f"{item}: {where} no slide or image files ({known}){hint}")
            found.extend(inside)
        elif item.is_file():
            found.append(item)
        else:
            raise SlideNotFoundError(f"{item}: file not found")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    stems: dict[str, Path] = {}
    for path in unique:
        if path.stem in stems:
            raise SlideError(f"{path} and {stems[path.stem]} have the same name and would share "
                             f"the output folder {path.stem}/: rename one or run them separately "
                             "with different --out folders")
        stems[path.stem] = path
    return unique
