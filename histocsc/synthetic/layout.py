"""What a phantom case contains, as coarse smooth fields and parametric shapes in H&E level-0 px.

Smooth things (tissue outline, tumour nests, stem-like regions, lymphoid aggregates, marker
regions, a fold, a pen stroke) are float fields on a coarse grid (one cell = `ds` px) that are
positive inside; thresholding their bilinear interpolation gives crisp outlines at any point, so
any tile of any section can be rendered on its own. Vessels, dust and bubbles are lists of shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from histocsc.synthetic.noise import smooth_field

FIELDS = ("tissue", "nest", "stem", "lymph", "fold", "pen")
# How far past the stem-like morphology each marker's positive region reaches (fraction of the
# region radius): CD44 is a little broader than CD133. Unknown markers get DEFAULT_BREADTH.
BREADTH = {"CD133": 0.0, "CD44": 0.3}
DEFAULT_BREADTH = 0.15
# The H&E signature each marker's field draws (see cells.py / render.py): "stem" = crowded,
# larger, rounder, hyperchromatic nuclei with high N:C; "halo" = vesicular nuclei with a
# prominent nucleolus and a clear perinuclear halo; "clear" = clear cytoplasm with crisp cell
# borders. CD133 and CD44 take theirs; other markers take the free ones in this order, and
# markers past the third have no H&E signature (documented in docs/phantom.md).
SIGNATURES = ("stem", "halo", "clear")
PREFERRED_SIGNATURE = {"CD133": "stem", "CD44": "halo"}
STEM_RADIUS_UM = (110.0, 260.0)
LYMPH_RADIUS_UM = (80.0, 200.0)
STEM_PER_MM2 = 1.3
LYMPH_PER_MM2 = 0.6
VESSELS_PER_MM2 = 3.0


@dataclass
class Region:
    """A stem-like region (or lymphoid aggregate): centre and radius in px, marker flags."""

    x: float
    y: float
    radius: float
    markers: tuple[str, ...] = ()


@dataclass
class Layout:
    """Everything needed to render any tile of a case's sections."""

    width: int
    height: int
    mpp: float
    ds: int
    markers: tuple[str, ...]
    fields: dict[str, np.ndarray]  # name -> (ceil(h/ds), ceil(w/ds)) float32, > 0 inside
    vessels: np.ndarray  # (K, 5): cx, cy, rx, ry, angle_rad (px)
    stem_regions: list[Region]
    lymph_regions: list[Region]
    dust: np.ndarray  # (K, 3): cx, cy, r (px), on the H&E slide
    bubbles: np.ndarray  # (K, 3): cx, cy, r (px), on the H&E slide
    fibre_angle: float  # radians, main stroma fibre direction
    stain: dict[str, float] = field(default_factory=dict)
    signatures: dict[str, str] = field(default_factory=dict)  # marker -> H&E signature
    _chunks: list[np.ndarray] | None = None

    @property
    def names(self) -> list[str]:
        """Field names in channel order: FIELDS then markers."""
        return list(FIELDS) + list(self.markers)

    def channel(self, name: str) -> int:
        """Index of a field in the last axis of `sample`'s result."""
        return self.names.index(name)

    def sample(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """All fields at level-0 points (u, v) (2-D maps or 1-D point lists), bilinear: (..., C)."""
        if self._chunks is None:  # cv2.remap takes at most 4 channels at a time
            names = self.names
            self._chunks = [
                np.ascontiguousarray(np.stack([self.fields[n] for n in names[i : i + 4]], -1))
                for i in range(0, len(names), 4)
            ]
        u = np.asarray(u, np.float32)
        v = np.asarray(v, np.float32)
        shape = u.shape
        if u.size == 0:
            return np.zeros(shape + (len(self.names),), np.float32)
        if u.ndim != 2:  # remap wants 2-D maps no wider than 32767
            n = u.size
            cols = 1024
            rows = max(1, -(-n // cols))
            pad = rows * cols - n
            u = np.concatenate([u.ravel(), np.full(pad, u.flat[0], np.float32)])
            v = np.concatenate([v.ravel(), np.full(pad, v.flat[0], np.float32)])
            u, v = u.reshape(rows, cols), v.reshape(rows, cols)
        mx = u / np.float32(self.ds) - np.float32(0.5)
        my = v / np.float32(self.ds) - np.float32(0.5)
        gh, gw = self.fields["tissue"].shape
        # Work on the window of the coarse grid that the points need.
        x0 = int(np.clip(np.floor(mx.min()) - 1, 0, gw - 1))
        y0 = int(np.clip(np.floor(my.min()) - 1, 0, gh - 1))
        x1 = int(np.clip(np.ceil(mx.max()) + 2, x0 + 1, gw))
        y1 = int(np.clip(np.ceil(my.max()) + 2, y0 + 1, gh))
        mx -= np.float32(x0)
        my -= np.float32(y0)
        outs = [
            cv2.remap(c[y0:y1, x0:x1], mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            .reshape(mx.shape + (c.shape[2],))
            for c in self._chunks
        ]
        out = np.concatenate(outs, -1)
        chans = out.shape[-1]
        return out.reshape(-1, chans)[: int(np.prod(shape))].reshape(shape + (chans,))

    def sample_one(self, grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Bilinear value of a coarse (same shape as the fields) array at 2-D maps (u, v)."""
        mx = u / np.float32(self.ds) - np.float32(0.5)
        my = v / np.float32(self.ds) - np.float32(0.5)
        return cv2.remap(grid, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def mask(self, marker: str) -> np.ndarray:
        """The marker-positive region as a bool array at `ds` (H&E level-0 / ds)."""
        return (self.fields[marker] > 0) & (self.fields["tissue"] > 0)

    def vessel_ids_near(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Indices of vessels whose bounding circle meets the box."""
        if not len(self.vessels):
            return np.zeros(0, int)
        r = self.vessels[:, 2:4].max(1) * 1.6
        cx, cy = self.vessels[:, 0], self.vessels[:, 1]
        ok = (cx + r >= x0) & (cx - r <= x1) & (cy + r >= y0) & (cy - r <= y1)
        return np.flatnonzero(ok)


def _blob(gx: np.ndarray, gy: np.ndarray, cx: float, cy: float, rx: float, ry: float,
          angle: float, rng: np.random.Generator, wobble: float) -> np.ndarray:
    """1 - d/r(theta) for a lobed ellipse: positive inside, 0 on the outline."""
    dx, dy = gx - cx, gy - cy
    c, s = np.cos(angle), np.sin(angle)
    a = (c * dx + s * dy) / rx
    b = (-s * dx + c * dy) / ry
    d = np.hypot(a, b)
    theta = np.arctan2(b, a)
    r = np.ones_like(d)
    for k in range(2, 7):
        r += rng.uniform(0, wobble / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return (1.0 - d / np.maximum(r, 0.3)).astype(np.float32)


def _window(shape: tuple[int, int], ds: int, cx: float, cy: float, r: float) -> tuple:
    """Slices of the coarse grid within `r` px of (cx, cy)."""
    i0, i1 = max(0, int((cy - r) // ds)), min(shape[0], int((cy + r) // ds) + 2)
    j0, j1 = max(0, int((cx - r) // ds)), min(shape[1], int((cx + r) // ds) + 2)
    return slice(i0, i1), slice(j0, j1)


def _band(shape: tuple[int, int], ds: int, p0: np.ndarray, p1: np.ndarray, bend: float,
          half_width: float) -> np.ndarray:
    """half_width - distance (px) to a gently curved segment p0 -> p1, on the coarse grid."""
    t = np.linspace(0, 1, 64)[:, None]
    mid = (p0 + p1) / 2 + bend * np.array([-(p1 - p0)[1], (p1 - p0)[0]])
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * mid + t**2 * p1
    canvas = np.full(shape, 255, np.uint8)
    cells = np.round((pts / ds - 0.5) * 16).astype(np.int32)
    cv2.polylines(canvas, [cells], False, 0, 1, cv2.LINE_8, 4)
    dist = cv2.distanceTransform(canvas, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return (half_width - dist * ds).astype(np.float32)


def _place(rng: np.random.Generator, ok: np.ndarray, ds: int, n: int, radius_px: tuple,
           taken: list[Region], gap: float) -> list[Region]:
    """Up to n regions centred where `ok` holds, not overlapping those already taken."""
    cand = np.argwhere(ok)
    out: list[Region] = []
    if not len(cand):
        return out
    for _ in range(n * 40):
        if len(out) >= n:
            break
        iy, ix = cand[rng.integers(len(cand))]
        x, y = (ix + 0.5) * ds, (iy + 0.5) * ds
        r = float(rng.uniform(*radius_px))
        if all(np.hypot(x - o.x, y - o.y) > r + o.radius + gap for o in taken + out):
            out.append(Region(float(x), float(y), r))
    return out


def make_layout(
    rng: np.random.Generator,
    width: int,
    height: int,
    mpp: float,
    markers: tuple[str, ...] = ("CD133", "CD44"),
    ds: int = 16,
    fill_frame: bool = False,
) -> Layout:
    """Draw a random case: tissue pieces, compartments, regions, vessels, artefacts.

    `fill_frame`: tissue covers the whole slide (a crop inside a larger section: no outline).
    """
    um = 1.0 / mpp  # px per micron
    gh, gw = -(-height // ds), -(-width // ds)
    gy, gx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    gx = (gx + 0.5) * ds
    gy = (gy + 0.5) * ds
    cell_um = ds * mpp

    # Tissue pieces inside a central disc, so any rotation keeps them on the IHC slide too.
    cx0, cy0 = width / 2, height / 2
    disc = 0.42 * min(width, height)
    n_pieces = int(rng.integers(2, 5))
    pieces = []
    tissue = np.full((gh, gw), -1.0, np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    for i in range(n_pieces):  # spread around the centre, long axis along the circle
        r = disc * rng.uniform(0.65, 0.85) * 0.95 / np.sqrt(n_pieces)
        ang = phase + 2 * np.pi * (i + rng.uniform(-0.12, 0.12)) / n_pieces
        dist = disc - r
        px, py = cx0 + dist * np.cos(ang), cy0 + dist * np.sin(ang)
        pieces.append((px, py, r))
        blob = _blob(gx, gy, px, py, r * rng.uniform(0.75, 1.0), r * rng.uniform(0.75, 1.0),
                     ang + np.pi / 2, rng, 0.45)
        tissue = np.maximum(tissue, blob)
    tissue += 0.12 * smooth_field(rng, (gh, gw), 300 / cell_um)
    tissue += 0.04 * smooth_field(rng, (gh, gw), 60 / cell_um)
    rim = disc * 1.12 - np.hypot(gx - cx0, gy - cy0)
    tissue = np.maximum(tissue, 0.25) if fill_frame else np.minimum(tissue, rim / disc * 4)

    nest = smooth_field(rng, (gh, gw), 140 / cell_um) + 0.35
    nest += 0.3 * smooth_field(rng, (gh, gw), 40 / cell_um)

    area_mm2 = float((tissue > 0).sum()) * (cell_um / 1000) ** 2
    inner = tissue > 0.12
    n_stem = max(2, int(round(area_mm2 * STEM_PER_MM2 * rng.uniform(0.8, 1.2))))
    stem_regions = _place(rng, inner, ds, n_stem, tuple(v * um for v in STEM_RADIUS_UM), [],
                          60 * um)
    n_lymph = max(1, int(round(area_mm2 * LYMPH_PER_MM2 * rng.uniform(0.7, 1.3))))
    lymph_regions = _place(rng, inner, ds, n_lymph, tuple(v * um for v in LYMPH_RADIUS_UM),
                           stem_regions, 120 * um)

    ragged = 0.12 * smooth_field(rng, (gh, gw), 50 / cell_um)
    stem = np.full((gh, gw), -1.0, np.float32)
    marker_fields = {m: np.full((gh, gw), -1.0, np.float32) for m in markers}
    for i, reg in enumerate(stem_regions):
        win = _window((gh, gw), ds, reg.x, reg.y, 2.5 * reg.radius)
        blob = _blob(gx[win], gy[win], reg.x, reg.y, reg.radius,
                     reg.radius * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi), rng, 0.35)
        blob += ragged[win]
        stem[win] = np.maximum(stem[win], blob)
        reg.markers = _marker_flags(rng, markers, i)
        for m in reg.markers:
            breadth = BREADTH.get(m, DEFAULT_BREADTH)
            marker_fields[m][win] = np.maximum(marker_fields[m][win], blob + breadth)
    lymph = np.full((gh, gw), -1.0, np.float32)
    for reg in lymph_regions:
        win = _window((gh, gw), ds, reg.x, reg.y, 2.5 * reg.radius)
        blob = _blob(gx[win], gy[win], reg.x, reg.y, reg.radius,
                     reg.radius * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi), rng, 0.4)
        lymph[win] = np.maximum(lymph[win], blob + ragged[win])
    # Stem-like regions and every marker region (CD44's broader rim too) lie in tumour nests,
    # so each marker-positive area holds the epithelial cells that carry its signature.
    reach = np.maximum.reduce([stem, *marker_fields.values()])
    nest = np.where(reach > -0.15, np.maximum(nest, 0.5), nest)
    nest = np.where(lymph > -0.2, np.minimum(nest, -0.3), nest)

    # Vessels / lumina: ellipses in tissue, away from the stem regions' cores.
    n_vessels = int(round(area_mm2 * VESSELS_PER_MM2))
    ok = inner & (reach < -0.2) & (lymph < -0.1)
    cand = np.argwhere(ok)
    vessels = []
    for _ in range(n_vessels * 20):
        if len(vessels) >= n_vessels or not len(cand):
            break
        iy, ix = cand[rng.integers(len(cand))]
        x, y = (ix + 0.5) * ds, (iy + 0.5) * ds
        rx = rng.uniform(12, 55) * um
        ry = rx * rng.uniform(0.4, 1.0)
        if all(np.hypot(x - v[0], y - v[1]) > rx + v[2] + 40 * um for v in vessels):
            vessels.append((x, y, rx, ry, rng.uniform(0, np.pi)))
    vessels_arr = np.asarray(vessels, np.float64).reshape(-1, 5)

    # A fold across one tissue piece, a pen stroke on the glass beside the tissue.
    px, py, r = pieces[int(rng.integers(len(pieces)))]
    ang = rng.uniform(0, np.pi)
    d = np.array([np.cos(ang), np.sin(ang)])
    off = rng.uniform(-0.5, 0.5) * r * np.array([-d[1], d[0]])
    p0 = np.array([px, py]) + off - d * r * 0.7
    p1 = np.array([px, py]) + off + d * r * 0.5
    fold = _band((gh, gw), ds, p0, p1, rng.uniform(-0.2, 0.2), rng.uniform(25, 60) * um)
    pa = rng.uniform(0, 2 * np.pi)
    start = np.array([cx0, cy0]) + disc * 1.05 * np.array([np.cos(pa), np.sin(pa)])
    tang = np.array([-np.sin(pa), np.cos(pa)])
    length = min(width, height) * rng.uniform(0.08, 0.15)
    pen = _band((gh, gw), ds, start, start + tang * length, rng.uniform(-0.3, 0.3),
                rng.uniform(60, 120) * um)
    pen += 8 * um * smooth_field(rng, (gh, gw), 100 / cell_um)

    n_dust = int(rng.integers(6, 16))
    dust = np.stack([rng.uniform(0, width, n_dust), rng.uniform(0, height, n_dust),
                     rng.uniform(2, 12, n_dust) * um], 1)
    bub_ang = rng.uniform(0, 2 * np.pi)
    bub_r = rng.uniform(150, 400) * um
    bub_d = rng.uniform(0.2, 0.9) * disc
    bubbles = np.array([[cx0 + bub_d * np.cos(bub_ang), cy0 + bub_d * np.sin(bub_ang), bub_r]])

    stain = {
        "h": float(rng.uniform(0.85, 1.15)),
        "e": float(rng.uniform(0.8, 1.2)),
        "hue": float(rng.uniform(-0.06, 0.06)),
        "ihc_h": float(rng.uniform(0.85, 1.15)),
        "dab": float(rng.uniform(0.8, 1.2)),
    }
    fields = {"tissue": tissue, "nest": nest.astype(np.float32), "stem": stem, "lymph": lymph,
              "fold": fold, "pen": pen.astype(np.float32)}
    fields.update(marker_fields)
    return Layout(
        width=width, height=height, mpp=mpp, ds=ds, markers=tuple(markers),
        fields={k: np.ascontiguousarray(v, np.float32) for k, v in fields.items()},
        vessels=vessels_arr, stem_regions=stem_regions, lymph_regions=lymph_regions,
        dust=dust, bubbles=bubbles, fibre_angle=float(rng.uniform(0, np.pi)), stain=stain,
        signatures=marker_signatures(markers),
    )


def marker_signatures(markers: tuple[str, ...]) -> dict[str, str]:
    """The H&E signature of each marker: CD133 -> stem, CD44 -> halo, others the free ones in
    SIGNATURES order; markers past the last signature get none (absent from the result)."""
    out = {m: PREFERRED_SIGNATURE[m] for m in markers if m in PREFERRED_SIGNATURE}
    free = [s for s in SIGNATURES if s not in out.values()]
    for m in markers:
        if m not in out and free:
            out[m] = free.pop(0)
    return out


def _marker_flags(rng: np.random.Generator, markers: tuple[str, ...], i: int) -> tuple[str, ...]:
    """Markers a stem-like region expresses: the first all, the second only the broadest one, the
    third only the narrowest one (so that a cohort shows every signature without the others: a
    marker seen only together with another cannot be told apart from it on H&E), then mostly all
    (65 %), the broadest alone (20 %) or one at random (15 %); never none."""
    roll = rng.random()
    if len(markers) <= 1:
        return tuple(markers)
    broad = max(markers, key=lambda m: BREADTH.get(m, DEFAULT_BREADTH))
    if i == 2:
        rest = [m for m in markers if m != broad]
        return (min(rest, key=lambda m: BREADTH.get(m, DEFAULT_BREADTH)),)
    if i == 0 or (i > 1 and roll < 0.65):
        return tuple(markers)
    if i == 1 or roll < 0.85:
        return (broad,)
    return (markers[int(rng.integers(len(markers)))],)
