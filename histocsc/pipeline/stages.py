"""The adapters of `prepare` onto the tiles and registration stages: one H&E tiled into a case
folder, one IHC registered onto it, a saved transform read back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from histocsc.errors import DataError, HistocscError
from histocsc.ihc.registration import RegistrationConfig
from histocsc.wsi.grid import TilesConfig


def make_tiles(
    he: Path, case_dir: Path, tiles_cfg: TilesConfig, he_mpp: float | None = None,
    force: bool = False,
) -> None:
    """Tile grid + tile store of the H&E into `case_dir` (grid.csv, grid.json, tiles.npy)."""
    from histocsc.wsi.extract import SlideTask, tile_slides

    task = SlideTask(path=he, out_dir=case_dir, slide_mpp=he_mpp)
    (result,) = tile_slides([task], tiles_cfg, save_images=True, workers=1, force=force)
    if result.error:
        raise DataError(f"{he}: tiling failed: {result.error}")


def tiling_warnings(he: Path, tiles_cfg: TilesConfig,
                    he_mpp: float | None) -> tuple[list[str], float | None]:
    """The warnings `tiles` gives for this H&E at these tile settings, and how many times finer
    than the slide's own pixels the tiles are (None: not finer)."""
    from histocsc.wsi.preflight import UPSAMPLE_WARN, check_tiling, open_with_pixel_size

    try:
        slide, _ = open_with_pixel_size(he, he_mpp, None)
        with slide:
            ratio = slide.mpp / tiles_cfg.mpp
            return (check_tiling(slide, tiles_cfg.tile_px, tiles_cfg.mpp),
                    round(ratio, 2) if ratio > UPSAMPLE_WARN else None)
    except HistocscError:
        return [], None  # tiling itself reports the problem as the case's error


def register_marker(
    he: Path, ihc: Path, out_dir: Path, register_cfg: RegistrationConfig,
    he_mpp: float | None = None, ihc_mpp: float | None = None,
) -> None:
    """Register one IHC (moving) onto the H&E (fixed): writes out_dir/transform.json.
    `he_mpp` / `ihc_mpp` are used only for a slide that records no pixel size."""
    from histocsc.ihc.registration import register, save_failure
    from histocsc.wsi.preflight import effective_slide_mpp

    try:
        fixed, moving = effective_slide_mpp(he, he_mpp)[0], effective_slide_mpp(ihc, ihc_mpp)[0]
        result = register(he, ihc, fixed, moving, cfg=register_cfg)
    except HistocscError as exc:
        save_failure(out_dir, exc)  # overlay of what was tried, never a stale one
        raise
    result.save(out_dir)


def load_transform(path: Path) -> tuple[Any, dict[str, Any], Any]:
    """(H&E -> IHC point map, the registration's error estimate, IHC -> H&E point map) from
    transform.json."""
    from histocsc.ihc.transform import Transform

    transform = Transform.load(path)
    return transform.to_moving, dict(transform.error), transform.to_fixed
