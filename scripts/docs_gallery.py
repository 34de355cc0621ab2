"""Regenerate the figures of docs/ with the commands themselves.

    python scripts/docs_gallery.py [--out docs/img] [--work DIR] [--only report,cohort,qc]

- report-cmu-1-small-region.png: `histocsc infer cmu-1-small-region.svs` (built-in model),
  report.html shot in headless Chromium;
- cohort-report.png: `histocsc infer` on a folder of both real SVS files (the TCGA one has no
  pixel size, so the cohort page shows a failure with its reason), cohort_report.html shot;
- registration-overlay.png, label-map.png: `histocsc phantom` (one case), `histocsc label`.

Needs ../shared/data/real (the real slides) and Chromium (`apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "data" / "real" / "svs"
MAX_PX = 1400

from histocsc.predict.browser import Page, find_chromium  # noqa: E402


def histocsc(*args: str) -> None:
    """Run one histocsc command as a user would; stop on failure unless told otherwise."""
    print("$ histocsc", " ".join(args), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
    subprocess.run([sys.executable, "-m", "histocsc", *args], check=False, env=env)


def shoot(page_path: Path, png: Path, width: int = 1400, height: int = 1000,
          full_page: bool = False) -> None:
    """Screenshot a local page in headless Chromium; refuse a page with console errors."""
    exe = find_chromium()
    if exe is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    with Page(exe, width, height) as page:
        page.open(page_path)
        page.screenshot(png, full_page=full_page)
        if page.errors or page.external_requests():
            raise SystemExit(f"{page_path}: {page.errors} {page.external_requests()}")
    print(f"wrote {png}")


def shrink(src: Path, dst: Path) -> None:
    """Copy an image, at most MAX_PX on its long side."""
    with Image.open(src) as im:
        im = im.convert("RGB")
        im.thumbnail((MAX_PX, MAX_PX))
        im.save(dst, optimize=True)
    print(f"wrote {dst}")


def report(out: Path, work: Path) -> None:
    histocsc("infer", str(REAL / "cmu-1-small-region.svs"), "--out", str(work / "o"))
    shoot(work / "o" / "cmu-1-small-region" / "report.html",
          out / "report-cmu-1-small-region.png", height=1150)


def cohort(out: Path, work: Path) -> None:
    slides = work / "slides"
    slides.mkdir(exist_ok=True)
    for svs in sorted(REAL.glob("*.svs")):
        link = slides / svs.name
        if not link.exists():
            link.symlink_to(svs)
    histocsc("infer", str(slides), "--out", str(work / "cohort"))  # exits 1: TCGA lacks mpp
    shoot(work / "cohort" / "cohort_report.html", out / "cohort-report.png", 1200, 360)


def qc(out: Path, work: Path) -> None:
    histocsc("phantom", str(work / "phantom"), "--cases", "1", "--size-px", "3072", "--mpp",
             "1.0", "--seed", "7")
    histocsc("label", "--cohort", str(work / "phantom" / "cohort.csv"), "--out",
             str(work / "prepared"))
    case = work / "prepared" / "case000"
    shrink(case / "register" / "CD133" / "overlay.png", out / "registration-overlay.png")
    shrink(case / "label_map_CD133.png", out / "label-map.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--work", type=Path, default=None, help="keep the outputs here")
    parser.add_argument("--only", default="report,cohort,qc")
    args = parser.parse_args()
    if not REAL.is_dir():
        raise SystemExit(f"{REAL}: the real test slides are needed")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="histocsc-gallery-"))
    work.mkdir(parents=True, exist_ok=True)
    steps = {"report": report, "cohort": cohort, "qc": qc}
    for name in args.only.split(","):
        steps[name](args.out, work)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
