"""Person crops that users bring: a folder of images, or a CSV listing images with their person ids.

- **Folder**: every image below it, subfolders included (the suffixes of :mod:`twinview.data.images`:
  ``.png .jpg .jpeg .tif .tiff``, any case; other files and macOS ``._*`` files are ignored), sorted
  by path. When every name is a Market-1501 name (``PPPP_cCsS_FFFFFF_BB.jpg``) the ids and cameras
  come from the names under the Market-1501 rules (:mod:`twinview.data.market1501`: junk dropped, a
  distractor query refused); when none is, the crops have no ids (``pid`` and ``camid`` None). A
  folder mixing the two is refused, naming the first other name: it is most likely a misnamed file.
  A Market-1501 root (``query/`` beside ``bounding_box_test/``) is refused too: give one of its splits.
- **CSV** (``.csv``, UTF-8): a required header ``path,person_id`` or ``path,person_id,camera``, then
  one row per image. Paths are relative to the CSV's folder, or absolute. Person ids and cameras are
  integers; they are labels only (0 and negative numbers have no special meaning). Blank lines are
  skipped. Each mistake is a :class:`~twinview.errors.DataError` naming the CSV and the line: a wrong
  header, a wrong number of columns, an empty cell, an id or camera that is not an integer, a path that
  is no image file or does not exist, a path listed twice; an empty CSV or one without rows is one too.

Only names are read here, never pixels: an unreadable image is reported by
:func:`twinview.data.images.load_image` (a DataError naming it) when the crops are embedded.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from twinview.data.images import IMAGE_SUFFIXES, is_image, list_image_files
from twinview.data.market1501 import GALLERY, NAME_REASON, QUERY, parse_market_name, person_record
from twinview.data.records import PersonRecord
from twinview.errors import DataError, display_path, is_link_loop, missing_path

PathLike = str | os.PathLike[str]

CSV_HEADERS = (("path", "person_id"), ("path", "person_id", "camera"))
CSV_FORM = "path,person_id[,camera]"


def read_person_source(path: PathLike, split: str = GALLERY) -> list[PersonRecord]:
    """The crops of a folder of images or a ``.csv`` file (see the module), as records of ``split``
    (``"query"`` or ``"bounding_box_test"``, the gallery); a DataError names a missing path or another
    kind of file."""
    path = Path(path)
    if path.is_dir():
        return read_person_folder(path, split)
    if path.is_file() and path.suffix.lower() == ".csv":
        return read_person_csv(path, split)
    if path.exists():
        raise DataError(path, f"neither a folder nor a .csv file: give a folder of images or a CSV "
                              f"{CSV_FORM}")
    raise missing_path(path, "no such folder or .csv file")


def read_person_folder(folder: PathLike, split: str = GALLERY) -> list[PersonRecord]:
    """One record per image below ``folder``: with Market-1501 ids when every name is one, else without."""
    folder = Path(folder)
    if (folder / QUERY).is_dir() and (folder / GALLERY).is_dir():
        raise DataError(folder, f"a Market-1501 folder: give its {QUERY}/ or {GALLERY}/ folder, or the whole "
                                "folder with `twinview reid eval --data`")
    files = list_image_files(folder)
    if not files:
        raise DataError(folder, f"no images ({', '.join(IMAGE_SUFFIXES)})")
    market = [_is_market_name(p) for p in files]
    if not any(market):
        return [PersonRecord(p, None, None, None, None, split) for p in files]
    if not all(market):
        other = files[market.index(False)]
        raise DataError(other, f"{NAME_REASON}, while other images in {display_path(folder)} do: rename it, "
                               f"or list the images in a CSV {CSV_FORM}")
    records = [r for r in (person_record(p, split) for p in files) if r is not None]
    if not records:
        raise DataError(folder, "only junk images (person id -1)")
    return records


def read_person_csv(csv_file: PathLike, split: str = GALLERY) -> list[PersonRecord]:
    """One record per row of a CSV ``path,person_id[,camera]`` (see the module for the rules)."""
    csv_file = Path(csv_file)
    try:
        text = csv_file.read_bytes().decode("utf-8-sig")  # -sig: spreadsheets often start with a BOM
    except UnicodeDecodeError as err:
        raise DataError(csv_file, f"not UTF-8 text (byte {err.start}): save the CSV as UTF-8") from None
    rows = csv.reader(io.StringIO(text, newline=""))
    header: tuple[str, ...] | None = None
    records: list[PersonRecord] = []
    lines: dict[str, int] = {}  # real path -> the line that listed it
    try:
        for row in rows:
            cells = [cell.strip() for cell in row]
            if not any(cells):
                continue
            if header is None:
                header = tuple(c.lower() for c in cells)
                if header not in CSV_HEADERS:
                    raise DataError(csv_file, f"line {rows.line_num}: the CSV must start with the header "
                                              f"{CSV_FORM}, not {','.join(cells)!r}")
                continue
            records.append(_csv_record(csv_file, rows.line_num, cells, header, split, lines))
    except csv.Error as err:
        raise DataError(csv_file, f"line {rows.line_num}: {err}") from None
    if header is None:
        raise DataError(csv_file, f"empty CSV: it needs the header {CSV_FORM} and one row per image")
    if not records:
        raise DataError(csv_file, "no rows below the header: list one image per row")
    return records


def _csv_record(csv_file: Path, line: int, cells: list[str], header: tuple[str, ...], split: str,
                lines: dict[str, int]) -> PersonRecord:
    """The record of one CSV row; ``lines`` collects the rows' real paths to find duplicates."""
    def fail(reason: str) -> DataError:
        return DataError(csv_file, f"line {line}: {reason}")

    if len(cells) != len(header):
        raise fail(f"{len(cells)} columns, the header {','.join(header)} has {len(header)}")
    for name, cell in zip(header, cells, strict=True):
        if not cell:
            raise fail(f"no {name}: every row needs every column of the header")
        if name != "path" and not _is_integer(cell):
            raise fail(f"{name} {cell!r} is not an integer")
    path = Path(cells[0])
    path = path if path.is_absolute() else csv_file.parent / path
    if not path.is_file():
        reason = ("symbolic link loop" if is_link_loop(path) else "not a file" if path.exists()
                  else "no such file")
        raise fail(f"{display_path(path)}: {reason}")
    if not is_image(path):
        raise fail(f"{display_path(path)}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
    real = os.path.realpath(path)
    if real in lines:
        raise fail(f"{display_path(path)} is listed already on line {lines[real]}")
    lines[real] = line
    camid = int(cells[2]) if len(cells) == 3 else None
    return PersonRecord(path, int(cells[1]), camid, None, None, split)


def _is_integer(cell: str) -> bool:
    try:
        int(cell)
    except ValueError:
        return False
    return True


def _is_market_name(path: Path) -> bool:
    try:
        parse_market_name(path)
    except DataError:
        return False
    return True

