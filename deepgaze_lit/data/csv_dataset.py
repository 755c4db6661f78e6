"""read_csv_dataset: users' own eye-tracking data as an image folder plus a CSV of fixations."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

import numpy as np

from .dataset import FixationDataset
from .errors import DataError
from .images import is_image_file, natural_key, read_image_size

REQUIRED_COLUMNS = ("image", "x", "y")
OPTIONAL_COLUMNS = ("subject", "t", "scanpath")


def _number(value: str, column: str, line: int, csv_path: Path) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise DataError(f"{csv_path}, line {line}: column '{column}' is {value!r}; expected a finite number")
    return number


def _ids(labels: list[str]) -> np.ndarray:
    """Integer ids for labels: the labels themselves when all are integers, else their rank in natural order."""
    try:
        return np.array([int(label) for label in labels], dtype=np.int64)
    except ValueError:
        ranks = {label: rank for rank, label in enumerate(sorted(set(labels), key=natural_key))}
        return np.array([ranks[label] for label in labels], dtype=np.int64)


def _read_rows(csv_path: Path) -> tuple[dict[str, list[str]], list[int]]:
    """Columns of the CSV as lists of strings (only the known columns) and each row's line number."""
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or [])]
        missing = [name for name in REQUIRED_COLUMNS if name not in header]
        if missing:
            found = ", ".join(header) or "none"
            raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)} (found {found}); "
                            f"expected a header with {', '.join(REQUIRED_COLUMNS)} and optionally "
                            f"{', '.join(OPTIONAL_COLUMNS)}")
        reader.fieldnames = header
        present = [name for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if name in header]
        columns: dict[str, list[str]] = {name: [] for name in present}
        lines = []
        for row in reader:
            for name in present:
                columns[name].append((row.get(name) or "").strip())
            lines.append(reader.line_num)
    if not lines:
        raise DataError(f"{csv_path}: no fixation rows; expected one row per fixation after the header")
    return columns, lines


def read_csv_dataset(images_dir: str | Path, csv_path: str | Path,
                     initial_fixation: Optional[bool] = None) -> FixationDataset:
    """Read an image folder and a CSV with one fixation per row.

    Columns: `image` (file name relative to `images_dir`), `x`, `y` (pixels of that image, 0-based, x to the
    right, y down) are required; `subject` (integer or label), `t` (seconds) and `scanpath` (any label; fixations
    with the same image and scanpath label form one scanpath, ordered by `t` when given, else by row order)
    are optional. With `scanpath`, each fixation's history is the preceding fixations of its scanpath and
    `initial_fixation` says whether scanpaths start with a forced central fixation (None: detect it).
    Images in the folder without any fixation are kept as images without fixations (the data module drops and
    reports them). Fixations outside their image are dropped and counted.
    """
    images_dir, csv_path = Path(images_dir), Path(csv_path)
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: image folder not found; expected the folder the CSV's 'image' column refers to")
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: CSV file not found; expected a CSV with columns {', '.join(REQUIRED_COLUMNS)}")
    columns, lines = _read_rows(csv_path)
    for name, line in zip(columns["image"], lines):
        if not name:
            raise DataError(f"{csv_path}, line {line}: empty 'image'; expected an image file name")
    referenced = set(columns["image"])
    missing = sorted(name for name in referenced if not (images_dir / name).is_file())
    if missing:
        raise DataError(f"{csv_path} refers to {len(missing)} image(s) missing from {images_dir}, e.g. {missing[0]}")
    unreferenced = {file.name for file in images_dir.iterdir() if is_image_file(file)} - referenced
    names = sorted(referenced | unreferenced, key=natural_key)
    index_of = {name: index for index, name in enumerate(names)}
    paths = [str(images_dir / name) for name in names]
    shapes = np.array([read_image_size(path) for path in paths], dtype=np.int64)

    n = np.array([index_of[name] for name in columns["image"]], dtype=np.int64)
    x = np.array([_number(v, "x", line, csv_path) for v, line in zip(columns["x"], lines)])
    y = np.array([_number(v, "y", line, csv_path) for v, line in zip(columns["y"], lines)])
    t = (np.array([_number(v, "t", line, csv_path) if v else math.nan for v, line in zip(columns["t"], lines)])
         if "t" in columns else np.full(len(x), np.nan))
    subject = _ids(columns["subject"]) if "subject" in columns else np.full(len(x), -1, dtype=np.int64)
    common = dict(shapes=shapes, image_paths=paths, source=str(csv_path))
    if "scanpath" not in columns:
        return FixationDataset(x=x, y=y, n=n, t=t, subject=subject, **common).without_fixations_outside()
    return _with_scanpaths(columns["scanpath"], x, y, t, n, subject, lines, csv_path,
                           initial_fixation, common).without_fixations_outside()


def _with_scanpaths(labels: list[str], x, y, t, n, subject, lines, csv_path: Path,
                    initial_fixation: Optional[bool], common: dict) -> FixationDataset:
    """Group rows into scanpaths keyed by (image, scanpath label) and build histories."""
    groups: dict[tuple[int, str], list[int]] = {}
    for row, (image, label) in enumerate(zip(n, labels)):
        groups.setdefault((int(image), label), []).append(row)
    max_length = max(len(rows) for rows in groups.values())
    xs, ys, ts = (np.full((len(groups), max_length), np.nan) for _ in range(3))
    ns = np.empty(len(groups), dtype=np.int64)
    subjects = np.empty(len(groups), dtype=np.int64)
    for index, ((image, label), rows) in enumerate(groups.items()):
        rows = np.array(rows)
        if np.isfinite(t[rows]).all():
            rows = rows[np.argsort(t[rows], kind="stable")]
        if len(set(subject[rows].tolist())) > 1:
            raise DataError(f"{csv_path}, line {lines[rows[0]]}: scanpath {label!r} on image {image} mixes "
                            "subjects; expected one subject per scanpath")
        xs[index, :len(rows)], ys[index, :len(rows)], ts[index, :len(rows)] = x[rows], y[rows], t[rows]
        ns[index], subjects[index] = image, subject[rows[0]]
    return FixationDataset.from_scanpaths(xs=xs, ys=ys, ts=ts, ns=ns, subjects=subjects,
                                          initial_fixation=initial_fixation, **common)
