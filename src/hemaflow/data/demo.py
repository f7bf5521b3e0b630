"""Synthetic, deterministic blood-smear datasets in the real sources' native layouts.

Cells are drawn in micrometres from their morphology (nucleus shape, chromatin, granules, size)
and rendered per *stain domain*: a palette transform, illumination, blur, noise and a physical
pixel size that mirror Acevedo_20 (10 px/um, 360x363 JPEG), Matek_19 (13.8 px/um, 400x400 RGBA
TIFF) and WBC1 (11.52 px/um, 288x288 TIFF). Class identity lives in the shapes; the domains
differ in colour and optics, so a classifier trained on the two source domains loses accuracy
on the target domain, which is the gap adaptation has to close.

The target domain carries the shifts measured between real labs (README, real cross-lab
benchmark), not only a colour matrix: a camera response curve per channel, an illumination
gradient across the image, a dark frame border, JPEG artefacts saved into its TIFFs, and white
cells 15 % larger in micrometres (the CellaVision blog's lymphocytes measure about 30 % larger
than Acevedo_20's: smear thickness and spreading differ between labs).

Written layouts (``out`` is ``data/demo`` in the pipeline):

- ``acevedo/<class>/<PREFIX>_<n>.jpg`` (no blasts: Acevedo_20 has none either)
- ``matek/<ABBR>/<ABBR>_<n>.tiff``
- ``wbc1/DATA-VAL/WBC1_<n>.TIF``: unlabelled target-domain cells
- ``wbc1_test/<class>/WBC1_TEST_<n>.TIF``: labelled target-domain cells, held out for evaluation
  (the HIDA challenge's class-folder layout)
- ``<domain>_fields/images/*.jpg`` + ``labels.csv`` (CytologIA ``NAME,x1,y1,x2,y2,class``):
  smear fields with 1-3 white cells, some with none (those have no CSV row, as in CytologIA)

The same params give the same bytes.
"""

from __future__ import annotations

import io
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from PIL import Image
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from hemaflow._io import atomic_dir, write_csv
from hemaflow.params import DemoDataParams
from hemaflow.tables import BOX

__all__ = ["CLASSES", "DOMAINS", "StainDomain", "demo_data", "render_cell_image"]

RGB = tuple[float, float, float]

# Demo classes, named in the fine taxonomy (data/classes.yaml); each source spells them its own way.
CLASSES = ("neutrophil_segmented", "lymphocyte_typical", "monocyte", "eosinophil", "basophil", "myeloblast")
ACEVEDO_NAMES = {  # folder, file prefix
    "neutrophil_segmented": ("neutrophil", "SNE"),
    "lymphocyte_typical": ("lymphocyte", "LY"),
    "monocyte": ("monocyte", "MO"),
    "eosinophil": ("eosinophil", "EO"),
    "basophil": ("basophil", "BA"),
}
MATEK_NAMES = {
    "neutrophil_segmented": "NGS",
    "lymphocyte_typical": "LYT",
    "monocyte": "MON",
    "eosinophil": "EOS",
    "basophil": "BAS",
    "myeloblast": "MYO",
}
CYTOLOGIA_NAMES = {
    "neutrophil_segmented": "PNN",
    "lymphocyte_typical": "LY",
    "monocyte": "MO",
    "eosinophil": "EO",
    "basophil": "BA",
    "myeloblast": "MBL",
}

# Canonical (unstained-domain) colours, RGB in [0, 1]; each domain maps them through its palette.
PLASMA: RGB = (0.93, 0.90, 0.88)
RBC: RGB = (0.87, 0.60, 0.60)
NUCLEUS: RGB = (0.36, 0.18, 0.48)
BLAST_NUCLEUS: RGB = (0.52, 0.34, 0.62)
NUCLEOLUS: RGB = (0.68, 0.58, 0.78)
CYTOPLASM: dict[str, RGB] = {
    "neutrophil_segmented": (0.88, 0.79, 0.83),
    "lymphocyte_typical": (0.66, 0.74, 0.92),
    "monocyte": (0.75, 0.75, 0.84),
    "eosinophil": (0.90, 0.76, 0.70),
    "basophil": (0.80, 0.72, 0.86),
    "myeloblast": (0.58, 0.65, 0.90),
}
EOSINOPHIL_GRANULE: RGB = (0.93, 0.52, 0.26)
BASOPHIL_GRANULE: RGB = (0.22, 0.08, 0.32)


@dataclass(frozen=True)
class StainDomain:
    """How one laboratory's stain, optics and scanner render a cell."""

    name: str
    px_per_um: float
    cell_image_px: tuple[int, int]  # (width, height) of a single-cell image
    palette: tuple[tuple[float, float, float], ...]  # 3x3 matrix applied to canonical RGB
    offset: RGB  # added after the palette
    gamma: RGB  # the camera's response curve, per channel
    blur_um: float
    noise: float
    vignette: float  # relative darkening at the image corners
    gradient: float = 0.0  # relative illumination change across the image, in a random direction
    border_px: int = 0  # dark frame border (field stop) around single-cell images
    jpeg_quality: int | None = None  # compression artefacts in images saved losslessly
    cell_scale: float = 1.0  # white-cell size in micrometres relative to the sources'


DOMAINS = {
    "acevedo": StainDomain(
        "acevedo", 10.0, (360, 363), ((1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)), (0, 0, 0), (1.0,) * 3, 0.08, 0.012, 0.05
    ),
    "matek": StainDomain(
        "matek",
        13.8,
        (400, 400),
        ((1.02, 0.10, -0.02), (-0.06, 0.88, 0.10), (0.04, 0.04, 1.0)),
        (-0.02, -0.02, 0.0),
        (1.15,) * 3,
        0.10,
        0.015,
        0.08,
    ),
    # Target: a different stain and camera: greenish-yellow background, washed-out, cooler nuclei;
    # a yellowing response curve, uneven light, a dark rim, JPEG artefacts and larger white cells.
    "wbc1": StainDomain(
        "wbc1",
        11.52,
        (288, 288),
        ((0.55, 0.35, 0.02), (0.05, 0.80, 0.15), (0.30, 0.10, 0.42)),
        (0.10, 0.06, 0.12),
        (0.75, 0.78, 1.25),
        0.16,
        0.025,
        0.15,
        gradient=0.25,
        border_px=10,
        jpeg_quality=70,
        cell_scale=1.15,
    ),
}
SOURCE_DOMAINS = ("acevedo", "matek")
TARGET_DOMAIN = "wbc1"
FIELD_UM = (40.0, 30.0)  # smear field width, height in micrometres
RED_CELL_RADIUS_UM = 3.75  # healthy adult red cells on films: about 7.5 um across (Bain, Blood Cells)


@dataclass(frozen=True)
class _Blob:
    """An ellipse in micrometres, relative to the cell centre."""

    x: float
    y: float
    a: float
    b: float
    angle: float = 0.0

    def coverage(self, xs: np.ndarray, ys: np.ndarray, px_per_um: float) -> np.ndarray:
        c, s = np.cos(self.angle), np.sin(self.angle)
        u = (xs - self.x) * c + (ys - self.y) * s
        v = -(xs - self.x) * s + (ys - self.y) * c
        distance_um = (np.sqrt((u / self.a) ** 2 + (v / self.b) ** 2) - 1.0) * min(self.a, self.b)
        return np.clip(0.5 - distance_um * px_per_um, 0.0, 1.0)  # one-pixel anti-aliased edge


def _union(blobs: list[_Blob], xs: np.ndarray, ys: np.ndarray, ppu: float) -> np.ndarray:
    cover = np.zeros_like(xs)
    for blob in blobs:
        cover = np.maximum(cover, blob.coverage(xs, ys, ppu))
    return cover


def _texture(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    field = gaussian_filter(rng.standard_normal(shape), max(scale_px, 0.5))
    return field / (field.std() + 1e-8)


def _paint(canvas: np.ndarray, cover: np.ndarray, colour: RGB | np.ndarray) -> None:
    alpha = cover[..., None]
    canvas *= 1.0 - alpha
    canvas += alpha * np.asarray(colour)


def _granules(rng: np.random.Generator, radius_um: float, count: int, size_um: float, within: float) -> list[_Blob]:
    radii = within * radius_um * np.sqrt(rng.random(count))
    angles = rng.random(count) * 2 * np.pi
    return [_Blob(r * np.cos(t), r * np.sin(t), size_um, size_um) for r, t in zip(radii, angles, strict=True)]


def _nucleus(cls: str, rng: np.random.Generator, radius: float) -> list[_Blob]:
    """Nucleus lobes for a class: the morphology that tells the classes apart."""
    turn = rng.random() * 2 * np.pi
    if cls == "neutrophil_segmented":
        lobes = int(rng.integers(3, 6))
        arc = np.linspace(-0.75 * np.pi, 0.75 * np.pi, lobes) * rng.uniform(0.8, 1.0) + turn
        blobs = [_Blob(2.9 * np.cos(t), 2.9 * np.sin(t), 1.5, 1.25, t) for t in arc]
        for t0, t1 in zip(arc[:-1], arc[1:], strict=True):  # thin chromatin strands between lobes
            mid = (t0 + t1) / 2
            blobs.append(_Blob(2.9 * np.cos(mid), 2.9 * np.sin(mid), 0.9, 0.22, mid + np.pi / 2))
        return blobs
    if cls == "lymphocyte_typical":
        return [_Blob(rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), 0.84 * radius, 0.8 * radius, turn)]
    if cls == "monocyte":
        return [_Blob(0.4 * np.cos(turn), 0.4 * np.sin(turn), 4.3, 3.1, turn)]  # notch cut in _render
    if cls == "eosinophil":
        dx, dy = 2.1 * np.cos(turn), 2.1 * np.sin(turn)
        return [_Blob(dx, dy, 1.9, 1.5, turn), _Blob(-dx, -dy, 1.9, 1.5, turn)]
    if cls == "basophil":
        return [_Blob(0, 0, 0.55 * radius, 0.5 * radius, turn)]
    if cls == "myeloblast":
        return [_Blob(0, 0, 0.8 * radius, 0.77 * radius, turn)]
    raise ValueError(f"unknown demo class {cls!r}; known: {', '.join(CLASSES)}")


CELL_RADIUS_UM = {
    "neutrophil_segmented": 6.0,
    "lymphocyte_typical": 4.4,
    "monocyte": 7.8,
    "eosinophil": 6.4,
    "basophil": 5.4,
    "myeloblast": 7.4,
}


def _render_wbc(
    canvas: np.ndarray, xs: np.ndarray, ys: np.ndarray, ppu: float, cls: str, size: float, rng: np.random.Generator
) -> np.ndarray:
    """Paint one white cell (its radius ``size`` times the class's) centred at (0, 0) of the (xs, ys)
    micrometre grid; return its mask."""
    radius = CELL_RADIUS_UM[cls] * size * rng.uniform(0.9, 1.1)
    body = _Blob(0, 0, radius, radius * rng.uniform(0.88, 1.0), rng.random() * np.pi)
    cell = body.coverage(xs, ys, ppu)
    _paint(canvas, cell, CYTOPLASM[cls])
    if cls == "neutrophil_segmented":  # faint, fine neutrophilic granules
        fine = _union(_granules(rng, radius, 60, 0.18, 0.9), xs, ys, ppu)
        _paint(canvas, 0.25 * fine * cell, (0.78, 0.62, 0.72))
    if cls == "monocyte":  # vacuoles
        _paint(canvas, _union(_granules(rng, radius, 6, 0.45, 0.85), xs, ys, ppu) * cell * 0.6, PLASMA)
    if cls == "eosinophil":  # coarse orange granules filling the cytoplasm
        _paint(canvas, _union(_granules(rng, radius, 170, 0.38, 0.92), xs, ys, ppu) * cell, EOSINOPHIL_GRANULE)

    nucleus = _union(_nucleus(cls, rng, radius), xs, ys, ppu)
    if cls == "monocyte":  # kidney shape: a notch cut into the oval nucleus
        turn = rng.random() * 2 * np.pi
        notch = _Blob(4.4 * np.cos(turn), 4.4 * np.sin(turn), 2.3, 2.3)
        nucleus *= 1.0 - notch.coverage(xs, ys, ppu)
    blast = cls == "myeloblast"
    chromatin = _texture(rng, xs.shape, (0.22 if blast else 0.55) * ppu)
    contrast = 0.06 if blast else 0.22  # fine, even chromatin in blasts; clumped in mature cells
    darkness = np.clip(1.0 + contrast * chromatin, 0.6, 1.4)[..., None]
    base = np.asarray(BLAST_NUCLEUS if blast else NUCLEUS)
    if cls == "lymphocyte_typical":
        base = base * 0.85  # dense, dark lymphocyte nucleus
    _paint(canvas, nucleus, np.clip(base * darkness, 0, 1))
    if blast:
        nucleoli = [
            _Blob(rng.uniform(-2.5, 2.5), rng.uniform(-2.5, 2.5), 0.75, 0.6, rng.random() * np.pi)
            for _ in range(int(rng.integers(1, 4)))
        ]
        _paint(canvas, _union(nucleoli, xs, ys, ppu) * nucleus * 0.8, NUCLEOLUS)
    if cls == "basophil":  # dark granules over nucleus and cytoplasm alike
        _paint(canvas, _union(_granules(rng, radius, 120, 0.42, 0.95), xs, ys, ppu) * cell, BASOPHIL_GRANULE)
    return cell


def _red_cells(canvas: np.ndarray, ppu: float, rng: np.random.Generator, density: float) -> None:
    height, width = canvas.shape[:2]
    area_um2 = width * height / ppu**2
    count = rng.poisson(density * area_um2 / (np.pi * RED_CELL_RADIUS_UM**2))
    for _ in range(count):
        cx, cy = rng.uniform(-3, width / ppu + 3), rng.uniform(-3, height / ppu + 3)
        radius = RED_CELL_RADIUS_UM * rng.uniform(0.93, 1.07)
        x0, x1 = max(int((cx - radius - 1) * ppu), 0), min(int((cx + radius + 1) * ppu) + 1, width)
        y0, y1 = max(int((cy - radius - 1) * ppu), 0), min(int((cy + radius + 1) * ppu) + 1, height)
        if x0 >= x1 or y0 >= y1:
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        xs, ys = (xs + 0.5) / ppu - cx, (ys + 0.5) / ppu - cy
        disc = _Blob(0, 0, radius, radius * rng.uniform(0.96, 1.0), rng.random() * np.pi).coverage(xs, ys, ppu)
        pallor = _Blob(0, 0, radius * 0.45, radius * 0.45).coverage(xs, ys, ppu)
        patch = canvas[y0:y1, x0:x1]
        _paint(patch, disc * 0.85, RBC)
        _paint(patch, disc * pallor * 0.45, PLASMA)


def _place_wbc(
    canvas: np.ndarray, ppu: float, cls: str, size: float, centre_um: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """Paint a white cell at ``centre_um``; return its box (x1, y1, x2, y2) in pixels."""
    height, width = canvas.shape[:2]
    reach = CELL_RADIUS_UM[cls] * size * 1.2 + 1
    cx, cy = centre_um
    x0, x1 = max(int((cx - reach) * ppu), 0), min(int((cx + reach) * ppu) + 1, width)
    y0, y1 = max(int((cy - reach) * ppu), 0), min(int((cy + reach) * ppu) + 1, height)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    mask = _render_wbc(canvas[y0:y1, x0:x1], (xs + 0.5) / ppu - cx, (ys + 0.5) / ppu - cy, ppu, cls, size, rng)
    rows, cols = np.nonzero(mask >= 0.5)
    return x0 + int(cols.min()), y0 + int(rows.min()), x0 + int(cols.max()) + 1, y0 + int(rows.max()) + 1


def _stain(canvas: np.ndarray, domain: StainDomain, rng: np.random.Generator, border: bool = False) -> np.ndarray:
    """Canonical RGB -> the domain's look, as uint8 (``border``: with the domain's dark frame border)."""
    image = canvas @ np.asarray(domain.palette).T + np.asarray(domain.offset)
    image = np.clip(image, 0, 1) ** np.asarray(domain.gamma)
    height, width = image.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    corner = ((xx / width - 0.5) ** 2 + (yy / height - 0.5) ** 2) / 0.5
    light = 1.0 - domain.vignette * corner
    if domain.gradient:  # drawn only where used, so the other domains keep their bytes
        turn = rng.random() * 2 * np.pi
        light *= 1.0 + domain.gradient * ((xx / width - 0.5) * np.cos(turn) + (yy / height - 0.5) * np.sin(turn))
    if border and domain.border_px:
        edge = np.minimum(np.minimum(xx, width - 1 - xx), np.minimum(yy, height - 1 - yy))
        light *= np.clip(0.15 + 0.85 * edge / domain.border_px, 0.15, 1.0)
    image *= light[..., None]
    sigma = domain.blur_um * domain.px_per_um
    image = gaussian_filter(image, sigma=(sigma, sigma, 0))
    image += rng.normal(0, domain.noise, image.shape)
    image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    if domain.jpeg_quality is not None:
        image = np.asarray(Image.open(io.BytesIO(_jpeg(image, domain.jpeg_quality))))
    return image


def render_cell_image(domain: StainDomain, cls: str, rng: np.random.Generator) -> np.ndarray:
    """One centred white cell among red cells, as the domain's single-cell image (H x W x 3)."""
    width, height = domain.cell_image_px
    ppu = domain.px_per_um
    canvas = np.empty((height, width, 3))
    canvas[:] = PLASMA
    _red_cells(canvas, ppu, rng, density=0.45)
    centre = (width / ppu / 2 + rng.uniform(-1, 1), height / ppu / 2 + rng.uniform(-1, 1))
    _place_wbc(canvas, ppu, cls, domain.cell_scale, centre, rng)
    return _stain(canvas, domain, rng, border=True)


def render_field(
    domain: StainDomain, classes: list[str], rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int, int]]]]:
    """A smear field with the given white cells placed without overlap; returns image, (class, box)s.

    A cell that finds no room is left out, so boxes never overlap.
    """
    ppu = domain.px_per_um
    width, height = round(FIELD_UM[0] * ppu), round(FIELD_UM[1] * ppu)
    canvas = np.empty((height, width, 3))
    canvas[:] = PLASMA
    _red_cells(canvas, ppu, rng, density=0.55)
    centres: list[tuple[float, float, float]] = []
    cells = []
    for cls in classes:
        reach = CELL_RADIUS_UM[cls] * domain.cell_scale * 1.15
        for _ in range(200):
            x, y = rng.uniform(reach, FIELD_UM[0] - reach), rng.uniform(reach, FIELD_UM[1] - reach)
            # boxes apart, not only cells: overlapping ground-truth boxes would blur the detector's task
            if all(max(abs(x - cx), abs(y - cy)) > reach + other + 0.5 for cx, cy, other in centres):
                break
        else:
            continue
        centres.append((x, y, reach))
        cells.append((cls, _place_wbc(canvas, ppu, cls, domain.cell_scale, (x, y), rng)))
    return _stain(canvas, domain, rng), cells


def _jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _domain_classes(domain: str) -> list[str]:
    return [c for c in CLASSES if domain != "acevedo" or c in ACEVEDO_NAMES]


def _render_job(job: tuple[str, str, str | None, int, int, float, Path]) -> list[dict]:
    """Render and write one image; return its CSV rows (smear fields only)."""
    kind, name, cls, index, seed, background_fields, root = job
    domain = DOMAINS[name]
    rng = _rng(
        seed,
        list(DOMAINS).index(name),
        ["cell", "target", "field", "test"].index(kind),
        index,
        CLASSES.index(cls) if cls else 0,
    )
    if kind == "cell":
        _write_cell(root, name, cls, index, render_cell_image(domain, cls, rng))
        return []
    if kind == "target":
        image = render_cell_image(domain, CLASSES[int(rng.integers(len(CLASSES)))], rng)
        path = root / "wbc1" / "DATA-VAL" / f"WBC1_{index:05d}.TIF"
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, image)
        return []
    if kind == "test":  # labelled target cells in the HIDA challenge's class-folder layout
        path = root / "wbc1_test" / cls / f"WBC1_TEST_{index:05d}.TIF"
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, render_cell_image(domain, cls, rng))
        return []
    available = _domain_classes(name)
    count = 0 if rng.random() < background_fields else int(rng.integers(1, 4))
    image, cells = render_field(domain, [available[int(k)] for k in rng.integers(len(available), size=count)], rng)
    file_name = f"{name}_field_{index:05d}.jpg"
    path = root / f"{name}_fields" / "images" / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg(image))
    return [
        {"NAME": file_name, "x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3], "class": CYTOLOGIA_NAMES[c]}
        for c, b in cells
    ]


def demo_data(*, params: DemoDataParams, seed: int, out: Path) -> None:
    """Write the three demo domains into ``out`` (replaced atomically), rendering in ``params.workers`` processes."""
    with atomic_dir(out) as staging:
        common = (seed, params.background_fields, staging)
        jobs = [
            ("cell", name, cls, i, *common)
            for name in SOURCE_DOMAINS
            for cls in _domain_classes(name)
            for i in range(params.cells_per_class)
        ]
        jobs += [("target", TARGET_DOMAIN, None, i, *common) for i in range(params.target_unlabelled_cells)]
        jobs += [
            ("test", TARGET_DOMAIN, CLASSES[i % len(CLASSES)], i, *common) for i in range(params.target_test_cells)
        ]
        jobs += [("field", name, None, i, *common) for name in DOMAINS for i in range(params.fields_per_domain)]
        progress = dict(total=len(jobs), desc="demo data", unit="image")
        with multiprocessing.get_context("fork").Pool(params.workers) as pool:
            results = list(tqdm(pool.imap(_render_job, jobs, chunksize=4), **progress))
        field_rows: dict[str, list[dict]] = {name: [] for name in DOMAINS}
        for job, rows in zip(jobs, results, strict=True):
            if job[0] == "field":
                field_rows[job[1]] += rows
        for name, rows in field_rows.items():
            frame = pd.DataFrame(rows, columns=["NAME", *BOX, "class"])
            write_csv(staging / f"{name}_fields" / "labels.csv", frame)


def _write_cell(root: Path, domain: str, cls: str, index: int, image: np.ndarray) -> None:
    if domain == "acevedo":
        folder, prefix = ACEVEDO_NAMES[cls]
        path = root / "acevedo" / folder / f"{prefix}_{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(image))
    else:  # Matek_19 TIFFs carry an (opaque) alpha channel
        abbr = MATEK_NAMES[cls]
        path = root / "matek" / abbr / f"{abbr}_{index:04d}.tiff"
        path.parent.mkdir(parents=True, exist_ok=True)
        alpha = np.full(image.shape[:2] + (1,), 255, np.uint8)
        tifffile.imwrite(path, np.concatenate([image, alpha], axis=2))
