"""Medical Segmentation Decathlon (MSD) task folders.

Layout: ``dataset.json`` (``name``, ``modality``, ``labels``, ``training``: a list of
``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``, ``test``: a list of image paths
or ``{"image": ...}``), with ``imagesTr/``, ``labelsTr/`` and ``imagesTs/`` beside it. Paths are
relative to the task folder. The reader follows dataset.json only, so stray files (such as the macOS
``._*`` files in the public releases) are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twinview.data.nifti import PathLike, volume_record
from twinview.data.records import VolumeRecord
from twinview.errors import DataError, display_path

DATASET_JSON = "dataset.json"


@dataclass(frozen=True)
class MSDIndex:
    """dataset.json parsed: metadata and the listed paths (files not yet checked)."""

    root: Path
    name: str
    modality: dict[str, str]
    labels: dict[int, str]
    training: list[tuple[Path, Path]]  # (image, label)
    test: list[Path]


@dataclass(frozen=True)
class MSDDataset:
    """An MSD task: metadata from dataset.json and one record per listed volume."""

    root: Path
    name: str
    modality: dict[str, str]
    labels: dict[int, str]
    training: list[VolumeRecord]
    test: list[VolumeRecord]


def read_msd(root: PathLike) -> MSDDataset:
    """Read dataset.json and the header of every listed volume; a missing listed file is a DataError."""
    index = read_dataset_json(root)
    training = [volume_record(listed_file(image), listed_file(label)) for image, label in index.training]
    test = [volume_record(listed_file(image)) for image in index.test]
    return MSDDataset(index.root, index.name, index.modality, index.labels, training, test)


def listed_file(path: Path) -> Path:
    """``path`` itself, or a DataError naming it when the file that dataset.json lists is absent."""
    if not path.is_file():
        raise DataError(path, "listed in dataset.json but not found")
    return path


def read_dataset_json(root: PathLike) -> MSDIndex:
    """Parse ``root/dataset.json``; missing, invalid or malformed JSON is a DataError naming it."""
    root = Path(root)
    json_path = root / DATASET_JSON
    data = load_dataset_json(json_path, "an MSD task folder")
    labels = data.get("labels", {})
    modality = data.get("modality", {})
    if not isinstance(labels, dict) or not isinstance(modality, dict):
        raise DataError(json_path, "'labels' and 'modality' must be objects")
    return MSDIndex(
        root=root,
        name=str(data.get("name", root.name)),
        modality={str(k): str(v) for k, v in modality.items()},
        labels=_parse_labels(json_path, labels),
        training=[
            _training_entry(root, json_path, i, e) for i, e in enumerate(_list(json_path, data, "training"))
        ],
        test=[_test_entry(root, json_path, i, e) for i, e in enumerate(_list(json_path, data, "test"))],
    )


def load_dataset_json(json_path: Path, layout: str) -> dict[str, Any]:
    """The object in a ``dataset.json``; DataError naming it when missing (not ``layout``), unreadable,
    invalid JSON or not an object."""
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(json_path, f"missing dataset.json: not {layout}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(json_path, f"invalid JSON: {display_path(str(exc))}") from exc
    if not isinstance(data, dict):
        raise DataError(json_path, "invalid dataset.json: top level must be an object")
    return data


def _parse_labels(json_path: Path, labels: dict[str, Any]) -> dict[int, str]:
    try:
        return {int(k): str(v) for k, v in labels.items()}
    except ValueError:
        raise DataError(json_path, f"'labels' keys must be integers, got {sorted(labels)}") from None


def _list(json_path: Path, data: dict[str, Any], key: str) -> list[Any]:
    entries = data.get(key, [])
    if not isinstance(entries, list):
        raise DataError(json_path, f"'{key}' must be a list")
    return entries


def _relative(root: Path, json_path: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise DataError(json_path, f"{where}: expected a file path, got {value!r}")
    return root / value


def _training_entry(root: Path, json_path: Path, i: int, entry: Any) -> tuple[Path, Path]:
    if not isinstance(entry, dict):
        raise DataError(json_path, f"training[{i}]: expected an object with 'image' and 'label'")
    image = _relative(root, json_path, entry.get("image"), f"training[{i}].image")
    label = _relative(root, json_path, entry.get("label"), f"training[{i}].label")
    return image, label


def _test_entry(root: Path, json_path: Path, i: int, entry: Any) -> Path:
    value = entry.get("image") if isinstance(entry, dict) else entry
    return _relative(root, json_path, value, f"test[{i}]")
