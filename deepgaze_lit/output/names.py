"""Which images a prediction run reads, and the names their outputs get.

- HDF5 dataset names are pysaliency's minimal unique file names (`minimal_unique_names`), so that pysaliency's
  `HDF5Model` finds each stimulus.
- Files written per image mirror the input's relative folder and keep its stem with the format's suffix
  (`a/x.jpg` -> `a/x.npy`). pysaliency's `ModelFromDirectory` / `SaliencyMapModelFromDirectory` match predictions
  to stimuli by relative path without extension, so two inputs in one folder with the same stem (`x.jpg`, `x.png`)
  could not be told apart there either: such a pair is refused with one error naming both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Protocol, Sequence

from deepgaze_lit.data.errors import DataError
from deepgaze_lit.data.images import is_image_file, natural_key


@dataclass(frozen=True)
class InputImage:
    """One input file: `path` on disk, `relative` to the input folder (a single file: its name), `key` its minimal
    unique name (the HDF5 dataset name, '/'-separated)."""

    path: Path
    relative: PurePosixPath
    key: str

    def mirrored(self, suffix: str) -> PurePosixPath:
        """The relative output path: the input's relative folder and stem with `suffix` (e.g. '.npy')."""
        return self.relative.with_suffix(suffix)


def minimal_unique_names(paths: Sequence[str]) -> list[str]:
    """pysaliency's minimal unique file names: split each path into components and drop leading components while
    all paths share the same first one; a single path gives its base name. Names are '/'-separated."""
    if len(set(paths)) != len(paths):
        raise ValueError("minimal unique names need distinct paths; a path is listed twice")
    if len(paths) <= 1:
        return [PurePosixPath(path).name for path in paths]
    parts = [PurePosixPath(path).parts for path in paths]
    while len({part[0] for part in parts}) == 1 and min(len(part) for part in parts) > 1:
        parts = [part[1:] for part in parts]
    return ["/".join(part) for part in parts]


def _is_hidden(relative: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def list_input_images(source: str | Path) -> list[InputImage]:
    """The images of a prediction run: `source` itself when it is an image file, else every image file below the
    folder `source` (subfolders walked, hidden files and folders skipped), in natural order of relative path."""
    source = Path(source)
    if source.is_file():
        if not is_image_file(source):
            raise DataError(f"{source}: not an image file; expected one of JPEG, PNG, BMP, TIFF, WebP, GIF "
                            "or a folder of them")
        return [InputImage(source, PurePosixPath(source.name), source.name)]
    if not source.is_dir():
        raise DataError(f"{source}: no such image file or folder")
    files = [path for path in source.rglob("*")
             if is_image_file(path) and not _is_hidden(PurePosixPath(path.relative_to(source).as_posix()))]
    if not files:
        raise DataError(f"{source}: no image files in this folder or its subfolders; expected JPEG or PNG files")
    relatives = sorted((PurePosixPath(path.relative_to(source).as_posix()) for path in files),
                       key=lambda relative: natural_key(str(relative)))
    _check_distinct_stems(source, relatives)
    keys = minimal_unique_names([str(relative) for relative in relatives])
    return [InputImage(source / relative, relative, key) for relative, key in zip(relatives, keys)]


def _check_distinct_stems(source: Path, relatives: Iterable[PurePosixPath]) -> None:
    seen: dict[PurePosixPath, PurePosixPath] = {}
    for relative in relatives:
        previous = seen.setdefault(relative.with_suffix(""), relative)
        if previous != relative:
            raise DataError(f"{source / previous} and {source / relative} have the same name apart from the "
                            "extension, so their outputs would share a name (pysaliency matches predictions by "
                            "name without extension); rename one of them or predict them separately")


class Destination(Protocol):
    """What `check_output_location` needs of a writer."""

    destination: Path

    def output_path(self, image: InputImage) -> Path:
        """The file that holds `image`'s output."""


def check_output_location(source: str | Path, images: Sequence[InputImage], writers: Sequence[Destination]) -> None:
    """Refuse outputs that could overwrite an input or be read back as one: a writer's destination equal to or
    inside the input folder, or (for a single input file) an output path equal to the input."""
    source = Path(source).resolve()
    for writer in writers:
        destination = writer.destination.resolve()
        if source.is_dir() and (destination == source or source in destination.parents):
            raise DataError(f"{writer.destination}: output inside the input folder {source}; "
                            "choose an output folder outside it")
        for image in images if source.is_file() else ():
            if writer.output_path(image).resolve() == image.path.resolve():
                raise DataError(f"{image.path}: the output would overwrite this input; choose another output folder")
