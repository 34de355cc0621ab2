"""Cells of a section: generated lazily per spatial bin of the H&E plane, from (seed, bin).

Each cell kind lies on its own jittered lattice; a lattice point becomes a cell when the layout
at that point is that kind's compartment. Two sections of a case (the H&E and an IHC) use
different seeds, so they share the regions but not the nuclei, as serial sections do.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from histocsc.synthetic.layout import Layout

STEM, TUMOUR, LYMPH, FIBRO, ENDO, RBC = 1, 2, 3, 4, 5, 6
BIN_UM = 128.0
# Columns of a cell table. SIG holds the cell's marker signatures other than "stem" (which is
# a cell kind) as bits: HALO, CLEAR.
CX, CY, RX, RY, ANGLE, OD, KIND, CYTO, RAND, SIG = range(10)
NCOL = 10
HALO, CLEAR = 1, 2
SIG_BITS = {"halo": HALO, "clear": CLEAR}
SIG_SHOWN = 0.92  # fraction of epithelial cells in a marker region that show its signature


@dataclass(frozen=True)
class Kind:
    """Morphology of a cell kind (sizes in microns)."""

    spacing: float  # lattice spacing
    occupancy: float  # chance a lattice point in the compartment holds a cell
    radius: tuple[float, float]  # nucleus half major axis
    aspect: tuple[float, float]  # minor / major
    od: tuple[float, float]  # hematoxylin optical density
    cyto: tuple[float, float]  # cytoplasm radius / nucleus radius (0: none drawn)


KINDS = {
    # Stem-like: crowded, large, round, hyperchromatic nuclei; thin rim of cytoplasm (high N:C).
    STEM: Kind(11.5, 0.95, (3.9, 5.2), (0.75, 1.0), (0.9, 1.25), (1.3, 1.5)),
    # Ordinary tumour cells: smaller oval vesicular nuclei, ample cytoplasm.
    TUMOUR: Kind(10.0, 0.95, (3.2, 4.3), (0.5, 0.8), (1.0, 1.45), (1.7, 2.1)),
    # Lymphocytes: dense, small, round, very dark (the "dark and crowded" distractor).
    LYMPH: Kind(6.3, 0.88, (2.3, 3.0), (0.85, 1.0), (1.5, 1.9), (0.0, 0.0)),
    # Stromal fibroblasts: sparse, thin, elongated along the fibres.
    FIBRO: Kind(20.0, 0.5, (4.5, 8.0), (0.2, 0.35), (1.0, 1.4), (0.0, 0.0)),
}


def _ramp(f: np.ndarray, width: float = 0.1) -> np.ndarray:
    return np.clip(f / width + 0.5, 0.0, 1.0)


def signature_field(layout: Layout, f: np.ndarray, signature: str) -> np.ndarray | None:
    """Max of the fields (last axis of `f`) of the markers drawn with `signature`, or None."""
    chans = [layout.channel(m) for m, s in layout.signatures.items() if s == signature]
    return f[..., chans].max(-1) if chans else None


def vessel_distance(layout: Layout, ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Normalised elliptic distance to the nearest of the vessels `ids` (< 1 inside a lumen)."""
    d = np.full(np.shape(x), np.inf, np.float32)
    for i in ids:
        cx, cy, rx, ry, a = layout.vessels[i]
        dx, dy = x - np.float32(cx), y - np.float32(cy)
        c, s = np.float32(np.cos(a)), np.float32(np.sin(a))
        e = np.hypot((c * dx + s * dy) / np.float32(rx), (-s * dx + c * dy) / np.float32(ry))
        np.minimum(d, e, out=d)
    return d


class CellSource:
    """Cells of one section of a case, with a per-bin cache."""

    def __init__(self, layout: Layout, seed: int) -> None:
        self.layout = layout
        self.seed = int(seed)
        self.um = 1.0 / layout.mpp
        self.bin_px = BIN_UM * self.um
        self._bin = lru_cache(maxsize=1024)(self._make_bin)
        self._vessel = lru_cache(maxsize=1024)(self._make_vessel)

    def cells_in(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """All cells whose centre lies in the box (H&E px), as an (N, NCOL) table."""
        b = self.bin_px
        parts = [
            self._bin(bx, by)
            for by in range(int(np.floor(y0 / b)), int(np.floor(y1 / b)) + 1)
            for bx in range(int(np.floor(x0 / b)), int(np.floor(x1 / b)) + 1)
        ]
        parts += [self._vessel(int(i)) for i in self.layout.vessel_ids_near(x0, y0, x1, y1)]
        cells = np.concatenate(parts) if parts else np.zeros((0, NCOL))
        inside = (cells[:, CX] >= x0) & (cells[:, CX] < x1)
        inside &= (cells[:, CY] >= y0) & (cells[:, CY] < y1)
        return cells[inside]

    def _make_bin(self, bx: int, by: int) -> np.ndarray:
        lay, um, b = self.layout, self.um, self.bin_px
        rng = np.random.default_rng([self.seed, bx + 2**20, by + 2**20])
        xs, ys, kinds = [], [], []
        for kind, k in KINDS.items():
            s = k.spacing * um
            i = np.arange(np.ceil(bx * b / s - 0.5), np.ceil((bx + 1) * b / s - 0.5))
            j = np.arange(np.ceil(by * b / s - 0.5), np.ceil((by + 1) * b / s - 0.5))
            jj, ii = np.meshgrid(j, i, indexing="ij")
            n = ii.size
            x = (ii.ravel() + 0.5 + rng.uniform(-0.3, 0.3, n)) * s
            y = (jj.ravel() + 0.5 + rng.uniform(-0.3, 0.3, n)) * s
            keep = rng.random(n) < k.occupancy
            xs.append(x[keep])
            ys.append(y[keep])
            kinds.append(np.full(int(keep.sum()), kind))
        x, y, kind = np.concatenate(xs), np.concatenate(ys), np.concatenate(kinds)
        if not len(x):
            return np.zeros((0, NCOL))
        f = lay.sample(x.astype(np.float32), y.astype(np.float32))
        tissue, nest = f[:, lay.channel("tissue")], f[:, lay.channel("nest")]
        # Stem-like cells follow the field of the marker drawn as "stem" (CD133), else, when
        # no marker is, the stem-like regions themselves.
        stem = signature_field(lay, f, "stem")
        stem = f[:, lay.channel("stem")] if stem is None else stem
        lymph = f[:, lay.channel("lymph")]
        rs, rl, rn = _ramp(stem), _ramp(lymph), _ramp(nest, 0.15)
        p = np.select(
            [kind == STEM, kind == TUMOUR, kind == LYMPH, kind == FIBRO],
            [
                rs,
                rn * (1 - rs) * (1 - rl),
                np.maximum(rl, 0.06 * (1 - rs)),
                (1 - rn) * (1 - rs) * (1 - rl),
            ],
        )
        ok = (rng.random(len(x)) < p) & (tissue > 0)
        ids = lay.vessel_ids_near(x.min(), y.min(), x.max(), y.max())
        if len(ids):
            ok &= vessel_distance(lay, ids, x.astype(np.float32), y.astype(np.float32)) > 1.25
        sig = np.zeros(len(x))
        epi = (kind == STEM) | (kind == TUMOUR)
        for name, bit in SIG_BITS.items():
            field = signature_field(lay, f, name)
            if field is not None:
                sig += bit * (epi & (field > 0) & (rng.random(len(x)) < SIG_SHOWN))
        x, y, kind, sig = x[ok], y[ok], kind[ok], sig[ok]
        n = len(x)
        out = np.zeros((n, NCOL))
        out[:, CX], out[:, CY], out[:, KIND] = x, y, kind
        for kd, k in KINDS.items():
            sel = kind == kd
            m = int(sel.sum())
            r = rng.uniform(*k.radius, m) * um
            out[sel, RX] = r
            out[sel, RY] = r * rng.uniform(*k.aspect, m)
            out[sel, OD] = rng.uniform(*k.od, m)
            out[sel, CYTO] = rng.uniform(*k.cyto, m) if k.cyto[1] else 0.0
            if kd == FIBRO:
                out[sel, ANGLE] = np.rad2deg(lay.fibre_angle) + rng.normal(0, 18, m)
            else:
                out[sel, ANGLE] = rng.uniform(0, 180, m)
        out[:, RAND] = rng.random(n)
        out[:, SIG] = sig
        return out

    def _make_vessel(self, i: int) -> np.ndarray:
        """Endothelial nuclei along the wall and red cells in the lumen of vessel i."""
        cx, cy, rx, ry, a = self.layout.vessels[i]
        um = self.um
        rng = np.random.default_rng([self.seed, 7, i])
        per = np.pi * (rx + ry)
        n = max(3, int(per / (22 * um)))
        t = np.sort(rng.uniform(0, 2 * np.pi, n))
        c, s = np.cos(a), np.sin(a)
        ex, ey = rx * 1.08 * np.cos(t), ry * 1.08 * np.sin(t)
        endo = np.zeros((n, NCOL))
        endo[:, CX] = cx + c * ex - s * ey
        endo[:, CY] = cy + s * ex + c * ey
        tx, ty = -rx * np.sin(t), ry * np.cos(t)
        endo[:, ANGLE] = np.rad2deg(np.arctan2(s * tx + c * ty, c * tx - s * ty))
        endo[:, RX] = rng.uniform(4.0, 6.0, n) * um
        endo[:, RY] = endo[:, RX] * rng.uniform(0.25, 0.4, n)
        endo[:, OD] = rng.uniform(1.0, 1.4, n)
        endo[:, KIND] = ENDO
        m = int(rng.integers(0, max(1, int(rx * ry / (um * um) / 90))))
        rr = np.sqrt(rng.uniform(0, 0.8, m))
        tt = rng.uniform(0, 2 * np.pi, m)
        bx, by = rx * rr * np.cos(tt), ry * rr * np.sin(tt)
        rbc = np.zeros((m, NCOL))
        rbc[:, CX] = cx + c * bx - s * by
        rbc[:, CY] = cy + s * bx + c * by
        rbc[:, RX] = rng.uniform(3.2, 3.9, m) * um
        rbc[:, RY] = rbc[:, RX] * rng.uniform(0.75, 1.0, m)
        rbc[:, ANGLE] = rng.uniform(0, 180, m)
        rbc[:, OD] = rng.uniform(0.7, 1.0, m)
        rbc[:, KIND] = RBC
        out = np.concatenate([endo, rbc])
        out[:, RAND] = rng.random(len(out))
        return out


def marker_compartment(marker: str | None) -> str:
    """Where the phantom draws a marker's DAB: its preset compartment (membrane by default)."""
    from histocsc.ihc.cells import compartment_for

    return compartment_for(marker, None) if marker else "membrane"


def ihc_positivity(layout: Layout, cells: np.ndarray, marker: str) -> np.ndarray:
    """DAB intensity (0: negative, else 0.35-1) of each cell (H&E-frame table) on the IHC of
    `marker`: epithelial cells whose centre lies in the marker region, about 10 % negative."""
    fm = layout.sample(cells[:, CX].astype(np.float32), cells[:, CY].astype(np.float32))
    inside = (fm[:, layout.channel(marker)] > 0) & (fm[:, layout.channel("tissue")] > 0)
    epi = (cells[:, KIND] == STEM) | (cells[:, KIND] == TUMOUR)
    rnd = cells[:, RAND]
    return np.where(inside & epi & (rnd > 0.1), 0.35 + 0.65 * (rnd - 0.1) / 0.9, 0.0)


TRUTH_COLUMNS = ("x", "y", "he_x", "he_y", "kind", "positive", "intensity", "radius", "separate")


def ihc_cell_truth(layout: Layout, seed: int, marker: str, forward, size: tuple[int, int]):
    """Every nucleus drawn on the IHC of `marker` (red cells excluded), as a (N, 9) table of
    TRUTH_COLUMNS: IHC level-0 x, y; H&E level-0 x, y; cell kind; positive 0/1; DAB intensity;
    mean nucleus radius (IHC px); separate 0/1: no other nucleus's centre within the larger of
    the two radii (a nucleus whose centre lies inside another's is one blob to any counter).
    `forward` maps H&E points onto the IHC; `size` is the IHC (width, height)."""
    from scipy.spatial import cKDTree

    cells = CellSource(layout, seed).cells_in(0, 0, layout.width, layout.height)
    cells = cells[cells[:, KIND] != RBC]
    pos = ihc_positivity(layout, cells, marker) * (cells[:, CYTO] > 0)
    xy = np.asarray(forward(cells[:, [CX, CY]]), np.float64).reshape(-1, 2)
    radius = (cells[:, RX] + cells[:, RY]) / 2
    separate = np.ones(len(cells), bool)
    if len(cells) > 1:
        pairs = cKDTree(xy).query_pairs(float(radius.max()), output_type="ndarray")
        d = np.hypot(*(xy[pairs[:, 0]] - xy[pairs[:, 1]]).T)
        close = pairs[d < np.maximum(radius[pairs[:, 0]], radius[pairs[:, 1]])]
        separate[close.ravel()] = False
    keep = (xy[:, 0] >= 0) & (xy[:, 0] < size[0]) & (xy[:, 1] >= 0) & (xy[:, 1] < size[1])
    table = np.column_stack([xy, cells[:, [CX, CY, KIND]], pos > 0, pos, radius, separate])
    return table[keep]
