"""Find the slides named on a command line: files as given, folders searched for slide files.

One finder for every command (`tiles`, `infer`, ...). A folder contributes its whole-slide files
(`SLIDE_SUFFIXES`); a folder that holds none contributes its plain images (PNG / JPEG / BMP),
which then need `--slide-mpp`; images beside slide files are left out, and `notify` says so.
With `recursive`, sub-folders are searched too (hidden ones are skipped). Slides keep the names
they were given (a symbolic link is named by the link, not its target); names that are one file
are reported through `notify`. Two slides with the same file stem would share one output folder:
that is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from histocsc.errors import SlideError, SlideNotFoundError

SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif"}
)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})


def _folder_slides(folder: Path, notify: Callable[[str], None]) -> list[Path]:
    """A folder's slide files, else its plain images, sorted by name."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    slides = [p for p in files if p.suffix.lower() in SLIDE_SUFFIXES]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if slides and images:
        shown = ", ".join(p.name for p in images[:5]) + (", ..." if len(images) > 5 else "")
        notify(f"{folder}: left out {len(images)} plain image file(s) beside its "
               f"{len(slides)} slide file(s) ({shown}); name an image directly to include it")
    return slides or images


def _folders(root: Path, recursive: bool) -> list[Path]:
    if not recursive:
        return [root]
    subs = sorted(p for p in root.rglob("*") if p.is_dir()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return [root, *subs]


def find_slides(inputs: list[Path], recursive: bool = False,
                notify: Callable[[str], None] | None = None) -> list[Path]:
    """Slide files named directly, plus those found in named folders (see the module doc), as
    absolute paths with the names given (links not resolved).

    Raises SlideError for a missing path, a folder without slides, or two slides whose output
    folders (their file stems) would clash. `notify` (default: nothing) hears what was left out
    and which names are one file."""
    notify = notify or (lambda _message: None)
    found: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            inside = [p for d in _folders(item, recursive) for p in _folder_slides(d, notify)]
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
    unique = list(dict.fromkeys(p.absolute() for p in found))
    targets: dict[Path, list[Path]] = {}
    for path in unique:
        targets.setdefault(path.resolve(), []).append(path)
    for target, names in targets.items():
        if len(names) > 1:
            notify(f"{', '.join(p.name for p in names)} are one file ({target}): each is "
                   "processed under its own name")
    stems: dict[str, Path] = {}
    for path in unique:
        if path.stem in stems:
            raise SlideError(f"{path} and {stems[path.stem]} have the same name and would share "
                             f"the output folder {path.stem}/: rename one or run them separately "
                             "with different --out folders")
        stems[path.stem] = path
    return unique
