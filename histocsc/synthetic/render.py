"""Pixels of a phantom section: H&E or hematoxylin + DAB IHC, one block at a time.

Stains are mixed in optical density (Beer-Lambert): RGB = 255 * exp(-sum_i c_i * v_i) for stain
vectors v_i. A block is rendered from the layout fields sampled at the H&E coordinates of its
pixels (through the inverse section transform for an IHC), cells drawn with OpenCV, and lattice
noise keyed on global coordinates, so every block is independent of the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from histocsc.synthetic.cells import (
    ANGLE,
    CLEAR,
    CX,
    CY,
    CYTO,
    HALO,
    KIND,
    LYMPH,
    OD,
    RAND,
    RBC,
    RX,
    RY,
    SIG,
    STEM,
    TUMOUR,
    CellSource,
    ihc_positivity,
    marker_compartment,
    vessel_distance,
)
from histocsc.synthetic.layout import Layout
from histocsc.synthetic.noise import fractal_noise, hash01, lattice_noise, smooth_field
from histocsc.synthetic.transform import SectionTransform

NOISE_TILE = 768  # period of the per-pixel noise pattern (blocks must be smaller)
PAD = 4  # px rendered around a block so blurs do not see its edge
SHIFT = 4  # sub-pixel bits for cv2 drawing
NUC_SCALE = 2.2  # nucleus layer value 255 means this hematoxylin OD

GLASS_OD = np.array([0.050, 0.056, 0.046], np.float32)
HEMATOXYLIN = np.array([0.60, 0.78, 0.30], np.float32)  # H&E (Harris, purple-blue)
EOSIN = np.array([0.09, 0.88, 0.42], np.float32)
RED_CELL = np.array([0.05, 1.0, 0.75], np.float32)
IHC_HEMATOXYLIN = np.array([0.76, 0.56, 0.26], np.float32)  # Mayer's, bluer
DAB = np.array([0.22, 0.50, 0.84], np.float32)
PEN = np.array([0.85, 0.25, 0.65], np.float32)  # green marker ink


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


@dataclass(frozen=True)
class Section:
    """One slide of a case: the H&E (no transform) or an IHC for `marker`."""

    kind: str  # "he" or "ihc"
    seed: int
    marker: str | None = None
    transform: SectionTransform | None = None


class SectionRenderer:
    """Renders any block of one section; `read_tile` fits `write_pyramid_tiff`."""

    def __init__(self, layout: Layout, section: Section, block: int = 512) -> None:
        self.layout = layout
        self.section = section
        self.cells = CellSource(layout, section.seed)
        self.block = block
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        st = layout.stain
        hue = st.get("hue", 0.0)
        self.v_h = _unit(HEMATOXYLIN + np.array([hue, 0, -hue], np.float32)) * st.get("h", 1)
        self.v_e = _unit(EOSIN + np.array([0, 0, hue], np.float32)) * st.get("e", 1)
        self.v_hi = _unit(IHC_HEMATOXYLIN) * st.get("ihc_h", 1)
        self.v_d = _unit(DAB) * st.get("dab", 1)
        t = section.transform
        self.a = t.matrix[:, :2] if t is not None else np.eye(2)
        rng = np.random.default_rng([section.seed, 99])
        gh, gw = layout.fields["tissue"].shape
        shade = 1.0 + 0.08 * smooth_field(rng, (gh, gw), 500 * layout.mpp / layout.ds)
        self._glass = (255.0 * np.exp(-shade[..., None] * GLASS_OD)).astype(np.float32)
        iy, ix = np.mgrid[0 : NOISE_TILE * 3, 0:NOISE_TILE]
        noise = (2.2 * (hash01(ix, iy, section.seed + 3) - 0.5)).astype(np.float32)
        noise = np.ascontiguousarray(noise.reshape(3, NOISE_TILE, NOISE_TILE).transpose(1, 2, 0))
        self._noise = np.pad(noise, ((0, NOISE_TILE), (0, NOISE_TILE), (0, 0)), mode="wrap")
        n = int(rng.integers(4, 10))
        um = 1.0 / layout.mpp
        self._ihc_dust = np.stack([rng.uniform(0, layout.width, n),
                                   rng.uniform(0, layout.height, n),
                                   rng.uniform(2, 10, n) * um], 1)

    # -- tiles --------------------------------------------------------------------------------
    def read_tile(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels [y, y+h) x [x, x+w) of the section, served from cached blocks."""
        b = self.block
        out = np.empty((h, w, 3), np.uint8)
        for by in range(y // b, (y + h - 1) // b + 1):
            for bx in range(x // b, (x + w - 1) // b + 1):
                key = (by, bx)
                if key not in self._cache:
                    if len(self._cache) > 4 * (self.layout.width // b + 2):
                        self._cache = {k: v for k, v in self._cache.items() if k[0] >= by}
                    bw = min(b, self.layout.width - bx * b)
                    bh = min(b, self.layout.height - by * b)
                    self._cache[key] = self.render(bx * b, by * b, bw, bh)
                blk = self._cache[key]
                ys, xs = max(y, by * b), max(x, bx * b)
                ye, xe = min(y + h, by * b + blk.shape[0]), min(x + w, bx * b + blk.shape[1])
                out[ys - y : ye - y, xs - x : xe - x] = blk[ys - by * b : ye - by * b,
                                                            xs - bx * b : xe - bx * b]
        return out

    # -- one block ----------------------------------------------------------------------------
    def render(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) for the level-0 region [x0, x0+w) x [y0, y0+h)."""
        X0, Y0, W, H = x0 - PAD, y0 - PAD, w + 2 * PAD, h + 2 * PAD
        sec, lay = self.section, self.layout
        # Slide-plane coordinates of this section's pixels (for glass and its own artefacts).
        px, py = np.meshgrid(np.arange(X0, X0 + W, dtype=np.float32) + 0.5,
                             np.arange(Y0, Y0 + H, dtype=np.float32) + 0.5)
        rgb = lay.sample_one(self._glass, px, py)
        od: list[np.ndarray] | None = None  # optical density, one (H, W) array per channel
        if not self._blank(X0, Y0, W, H):
            if sec.transform is None:
                u, v = px, py
            else:
                u, v = sec.transform.inverse_maps(X0, Y0, W, H)
            f = lay.sample(u, v)
            tissue = f[..., lay.channel("tissue")]
            if tissue.max() > -0.02:
                od = self._tissue(f, u, v, X0, Y0, W, H, tissue)
            if sec.kind == "he":
                od = self._pen(od, f, px, py)
        dust, bubbles = (lay.dust, lay.bubbles) if sec.kind == "he" else (self._ihc_dust, ())
        od = self._specks(od, px, py, dust, bubbles)
        if od is not None:
            rgb *= cv2.exp(-cv2.merge(od))
        ny, nx = Y0 % NOISE_TILE, X0 % NOISE_TILE
        rgb += self._noise[ny : ny + H, nx : nx + W]
        rgb = cv2.convertScaleAbs(rgb)  # rounds and saturates to uint8
        return rgb[PAD : PAD + h, PAD : PAD + w]

    def _blank(self, X0: int, Y0: int, W: int, H: int) -> bool:
        """True when no tissue (and, for the H&E, no pen) can reach the block."""
        lay, t = self.layout, self.section.transform
        corners = np.array([[X0, Y0], [X0 + W, Y0], [X0, Y0 + H], [X0 + W, Y0 + H]], float)
        margin = 2.0 * lay.ds
        if t is not None:
            corners = t.inverse(corners)
            margin += float(np.abs(t.amplitudes).sum()) * 2
        (ux0, uy0), (ux1, uy1) = corners.min(0) - margin, corners.max(0) + margin
        gh, gw = lay.fields["tissue"].shape
        i0, i1 = int(np.clip(uy0 // lay.ds, 0, gh)), int(np.clip(uy1 // lay.ds + 1, 0, gh))
        j0, j1 = int(np.clip(ux0 // lay.ds, 0, gw)), int(np.clip(ux1 // lay.ds + 1, 0, gw))
        if i1 <= i0 or j1 <= j0:
            return True
        if lay.fields["tissue"][i0:i1, j0:j1].max() > -0.05:
            return False
        return t is not None or lay.fields["pen"][i0:i1, j0:j1].max() < 0

    def _tissue(self, f: np.ndarray, u: np.ndarray, v: np.ndarray, X0: int, Y0: int,
                W: int, H: int, tissue: np.ndarray) -> list[np.ndarray]:
        lay, sec, um = self.layout, self.section, 1.0 / self.layout.mpp
        he = sec.kind == "he"
        seed = sec.seed
        # Tissue alpha with lumina cut out.
        alpha = (tissue > 0).astype(np.float32)
        umin, umax, vmin, vmax = float(u.min()), float(u.max()), float(v.min()), float(v.max())
        ids = lay.vessel_ids_near(umin, vmin, umax, vmax)
        wall = np.zeros((H, W), np.float32)
        if len(ids):
            dv = vessel_distance(lay, ids, u, v)
            alpha *= (dv >= 1.0).astype(np.float32)
            wall = np.clip(1.0 - np.abs(dv - 1.12) / 0.12, 0, 1) * (tissue > 0)
        alpha = cv2.GaussianBlur(alpha, (0, 0), 0.7)

        nest = np.clip(f[..., lay.channel("nest")] / 0.15 + 0.5, 0, 1)
        lymph = np.clip(f[..., lay.channel("lymph")] / 0.1 + 0.5, 0, 1)
        # Stroma fibres: anisotropic noise along the case's fibre angle, domain-warped.
        c, s = float(np.cos(lay.fibre_angle)), float(np.sin(lay.fibre_angle))
        warp = (lattice_noise(u / (70 * um), v / (70 * um), seed + 21) - 0.5) * 3.0
        along = (c * u + s * v) / np.float32(35 * um)
        across = (-s * u + c * v) / np.float32(2.8 * um) + warp * 6
        fib = lattice_noise(along, across, seed + 22)
        fib = 0.6 * fib + 0.4 * lattice_noise(along * 2.3, across * 1.7, seed + 23)
        fine = lattice_noise(u / (1.3 * um), v / (1.3 * um), seed + 24)
        # Smooth variations (>= 120 um) are computed every 8 px and interpolated.
        us, vs = u[::8, ::8], v[::8, ::8]
        smooth = np.stack([fractal_noise(us, vs, 120 * um, seed + 25, 2),
                           fractal_noise(us, vs, 500 * um, seed + 26, 2),
                           fractal_noise(us, vs, 500 * um, seed + 27, 2)], -1)
        smooth = cv2.resize(smooth, (W, H), interpolation=cv2.INTER_LINEAR)
        coarse, h_var, e_var = smooth[..., 0], smooth[..., 1], smooth[..., 2]

        nuc, cyto, memb, rbc, clear, nucd = self._draw_cells(u, v, X0, Y0, W, H)
        where = marker_compartment(sec.marker)
        # Irregular outlines: displace the drawn cells by a smooth field of about 0.5 um.
        amp = np.float32(0.6 * um)
        gx, gy = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
        gx += (lattice_noise(u / (4.5 * um), v / (4.5 * um), seed + 31) - 0.5) * 2 * amp
        gy += (lattice_noise(u / (4.5 * um), v / (4.5 * um), seed + 32) - 0.5) * 2 * amp
        nuc, cyto, memb, clear, nucd = (cv2.remap(layer, gx, gy, cv2.INTER_LINEAR,
                                                  borderMode=cv2.BORDER_REPLICATE)
                                        for layer in (nuc, cyto, memb, clear, nucd))
        nuc_mask = np.clip(nuc * 3.0, 0, 1)
        # Cleared cytoplasm (perinuclear halo, clear cells) keeps little stain but the nucleus.
        keep = 1.0 - 0.85 * clear * (1.0 - nuc_mask)
        nuc_od = nuc * (0.72 + 0.56 * fine)

        stroma_e = 0.10 + 0.4 * fib + 0.4 * np.maximum(fib - 0.42, 0)
        if he:
            e = (1 - nest) * stroma_e + nest * (0.16 + 0.08 * fine)
            e = e * (1 - 0.55 * lymph) + 0.06 * lymph
            e += cyto * (0.5 + 0.15 * coarse) + 0.55 * wall
            e = e * keep + 0.2 * nuc_mask
            hx = (0.03 + 0.04 * nest + (0.04 + 0.2 * coarse) * cyto) * keep + nuc_od + 0.05 * lymph
            fold = np.clip(f[..., lay.channel("fold")] / (3 * um), 0, 1)
            gain = 1.0 + 0.75 * fold
            # Uneven staining across the slide, so that darkness alone is not a class cue.
            h_gain = gain * (0.65 + 0.7 * h_var)
            e_gain = gain * (0.75 + 0.5 * e_var)
            hx *= h_gain
            e *= e_gain
            rbc *= 1.1
            terms = [(hx, self.v_h), (e, self.v_e), (rbc, _unit(RED_CELL))]
        else:
            hx = 0.07 + 0.12 * (1 - nest) * fib + 0.07 * cyto + 0.42 * nuc_od + 0.08 * wall
            dab = 0.03 + 0.04 * coarse + 0.02 * nest  # weak non-specific background
            dab = dab + memb * (1.5 + 0.8 * coarse)
            dab *= 1.0 - 0.6 * nuc_mask
            dab += nucd * (1.1 + 0.6 * coarse)  # nuclear marker: brown nuclei
            if where == "cytoplasm":
                dab += memb * (0.3 + 0.2 * coarse)  # cytoplasmic stain: the nuclei too
            dab += 0.2 * rbc
            terms = [(hx, self.v_hi), (dab, self.v_d)]
        for layer, _ in terms:
            layer *= alpha
        return [sum(layer * float(vec[c]) for layer, vec in terms) for c in range(3)]

    def _draw_cells(self, u: np.ndarray, v: np.ndarray, X0: int, Y0: int, W: int, H: int):
        """Nucleus OD, cytoplasm, DAB (IHC), red-cell and cleared-cytoplasm layers, float32
        (H, W). Marker signatures (HALO, CLEAR) are drawn on the H&E only."""
        lay, sec, um = self.layout, self.section, 1.0 / self.layout.mpp
        margin = 20 * um
        cells = self.cells.cells_in(float(u.min()) - margin, float(v.min()) - margin,
                                    float(u.max()) + margin, float(v.max()) + margin)
        nuc = np.zeros((H, W), np.uint8)
        cyto = np.zeros((H, W), np.uint8)
        rbc = np.zeros((H, W), np.uint8)
        memb = np.zeros((H, W), np.uint8)
        clear = np.zeros((H, W), np.uint8)
        nucd = np.zeros((H, W), np.uint8)  # DAB of positive nuclei (a nuclear marker)
        where = marker_compartment(sec.marker)
        if not len(cells):
            return tuple(np.zeros((H, W), np.float32) for _ in range(6))
        centres = cells[:, [CX, CY]]
        rx, ry, ang = cells[:, RX].copy(), cells[:, RY].copy(), cells[:, ANGLE].copy()
        pos = np.zeros(len(cells))
        if sec.transform is not None:
            t = sec.transform
            mapped = t.forward(centres)
            d = np.stack([np.cos(np.deg2rad(ang)), np.sin(np.deg2rad(ang))], 1) @ self.a.T
            ang = np.rad2deg(np.arctan2(d[:, 1], d[:, 0]))
            rx *= t.scale
            ry *= t.scale
            pos = ihc_positivity(lay, cells, sec.marker)
        else:
            mapped = centres
        sc = float(1 << SHIFT)
        cx = np.round((mapped[:, 0] - X0 - 0.5) * sc).astype(np.int64)
        cy = np.round((mapped[:, 1] - Y0 - 0.5) * sc).astype(np.int64)
        kinds = cells[:, KIND].astype(int)
        sigs = cells[:, SIG].astype(int) if sec.kind == "he" else np.zeros(len(cells), int)
        order = np.argsort(kinds == LYMPH, kind="stable")  # lymphocytes over the rest
        aa = cv2.LINE_AA
        memb_t = max(1, int(round(1.5 * um)))
        for i in order:
            k = kinds[i]
            c = (int(cx[i]), int(cy[i]))
            a = float(ang[i])
            if k == RBC:
                axes = (int(rx[i] * sc), int(ry[i] * sc))
                cv2.ellipse(rbc, c, axes, a, 0, 360, int(255 * cells[i, OD]), -1, aa, SHIFT)
                continue
            if cells[i, CYTO] > 0:
                f = cells[i, CYTO]
                axes = (int(rx[i] * f * sc), int(ry[i] * (0.5 + 0.5 * f) * sc))
                if sigs[i] & CLEAR:  # clear cytoplasm inside a crisp eosinophilic border
                    cv2.ellipse(cyto, c, axes, a, 0, 360, 60, -1, aa, SHIFT)
                    cv2.ellipse(clear, c, axes, a, 0, 360, 200, -1, aa, SHIFT)
                    cv2.ellipse(cyto, c, axes, a, 0, 360, 255, memb_t, aa, SHIFT)
                else:
                    cv2.ellipse(cyto, c, axes, a, 0, 360, 200 + int(55 * cells[i, RAND]), -1,
                                aa, SHIFT)
                    cv2.ellipse(cyto, c, axes, a, 0, 360, 170, 1, aa, SHIFT)
                if sigs[i] & HALO:  # a thin clear ring around the nucleus
                    hw = (1.2 + 0.6 * cells[i, RAND]) * um
                    halo = (int((rx[i] + hw) * sc), int((ry[i] + hw) * sc))
                    cv2.ellipse(clear, c, halo, a, 0, 360, 255, -1, aa, SHIFT)
                if pos[i] > 0 and where == "membrane":
                    val = int(255 * pos[i])
                    cv2.ellipse(memb, c, axes, a, 0, 360, int(val * 0.8), -1, aa, SHIFT)
                    cv2.ellipse(memb, c, axes, a, 0, 360, val, memb_t, aa, SHIFT)
                elif pos[i] > 0 and where == "cytoplasm":  # the whole cell body, evenly
                    body = (int(axes[0] * 1.2), int(axes[1] * 1.2))
                    cv2.ellipse(memb, c, body, a, 0, 360, int(255 * pos[i]), -1, aa, SHIFT)
        for i in order:
            k = kinds[i]
            if k == RBC:
                continue
            c = (int(cx[i]), int(cy[i]))
            a = float(ang[i])
            axes = (int(rx[i] * sc), int(ry[i] * sc))
            val = int(min(255, 255 * cells[i, OD] / NUC_SCALE))
            cv2.ellipse(nuc, c, axes, a, 0, 360, val, -1, aa, SHIFT)
            if pos[i] > 0 and where == "nuclear" and cells[i, CYTO] > 0:
                cv2.ellipse(nucd, c, axes, a, 0, 360, int(255 * pos[i]), -1, aa, SHIFT)
            if sigs[i] & HALO:  # open pale chromatin, dark rim, prominent central nucleolus
                inner = (int(rx[i] * 0.8 * sc), int(ry[i] * 0.8 * sc))
                cv2.ellipse(nuc, c, inner, a, 0, 360, int(val * 0.32), -1, aa, SHIFT)
                off = (int(c[0] + rx[i] * 0.12 * sc), int(c[1] - ry[i] * 0.1 * sc))
                cv2.circle(nuc, off, int((1.0 + 0.4 * cells[i, RAND]) * um * sc), 255, -1, aa,
                           SHIFT)
            elif k == TUMOUR:  # vesicular: paler centre, nucleolus
                inner = (int(rx[i] * 0.62 * sc), int(ry[i] * 0.62 * sc))
                cv2.ellipse(nuc, c, inner, a, 0, 360, int(val * 0.55), -1, aa, SHIFT)
                if cells[i, RAND] < 0.5:
                    cv2.circle(nuc, c, int(0.8 * um * sc), val, -1, aa, SHIFT)
            elif k == STEM and cells[i, RAND] < 0.5:
                off = (int(c[0] + rx[i] * 0.25 * sc), int(c[1] - ry[i] * 0.2 * sc))
                cv2.circle(nuc, off, int(1.0 * um * sc), 255, -1, aa, SHIFT)
        scale = np.float32(NUC_SCALE / 255.0)
        return (nuc.astype(np.float32) * scale, cyto.astype(np.float32) / 255.0,
                memb.astype(np.float32) / 255.0, rbc.astype(np.float32) / 255.0,
                clear.astype(np.float32) / 255.0, nucd.astype(np.float32) / 255.0)

    def _pen(self, od: list[np.ndarray] | None, f: np.ndarray, px: np.ndarray,
             py: np.ndarray) -> list[np.ndarray] | None:
        lay, um = self.layout, 1.0 / self.layout.mpp
        pen = f[..., lay.channel("pen")]
        if pen.max() > -2 * um:
            a = np.clip(pen / (4 * um) + 0.5, 0, 1)
            a *= 0.9 * (0.75 + 0.5 * lattice_noise(px / (30 * um), py / (4 * um), 91))
            od = _add(od, a, PEN)
        return od

    @staticmethod
    def _specks(od: list[np.ndarray] | None, px: np.ndarray, py: np.ndarray, dust: np.ndarray,
                bubbles: np.ndarray) -> list[np.ndarray] | None:
        """Dust specks and air-bubble rims (on the slide plane, over everything)."""
        x0, x1, y0, y1 = px[0, 0], px[0, -1], py[0, 0], py[-1, 0]
        for cx, cy, r in dust:
            if cx + r < x0 or cx - r > x1 or cy + r < y0 or cy - r > y1:
                continue
            d = np.hypot(px - cx, py - cy) / np.float32(r)
            od = _add(od, np.clip(1.2 - d, 0, 1) * 1.4, (1.0, 1.0, 1.0))
        for cx, cy, r in bubbles:
            if cx + r + 12 < x0 or cx - r - 12 > x1 or cy + r + 12 < y0 or cy - r - 12 > y1:
                continue
            d = np.hypot(px - cx, py - cy)
            rim = np.exp(-(((d - r) / 3.0) ** 2)) * 0.55 + np.exp(-(((d - r + 7) / 2.0) ** 2)) * 0.2
            inside = (d < r).astype(np.float32)
            if od is None:
                od = [np.zeros(px.shape, np.float32) for _ in range(3)]
            # A bubble looks a little brighter than the glass, with a dark rim.
            od = [ch * (1.0 - 0.25 * inside) - 0.012 * inside + rim for ch in od]
        return od


def _add(od: list[np.ndarray] | None, weight: np.ndarray, vec) -> list[np.ndarray]:
    """od + weight * vec, channel by channel (od None means zero)."""
    if od is None:
        return [(weight * float(vec[c])).astype(np.float32) for c in range(3)]
    for c in range(3):
        od[c] += weight * float(vec[c])
    return od
