"""The segmentation app: uploads read as training read them, refused in one line when bad, shown in the page.

One tiny 2D U-Net (test_export's SEG_META: MRI, z-score, slice axis 2, RAS) is exported once per module;
the library is held to the training readers (MONAI's orientation, ``twinview.data.dicom``), and the page is
driven with Streamlit's AppTest.
"""

from __future__ import annotations

import gzip
import io
import pickle
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from streamlit.testing.v1 import AppTest

from apps import volumes
from apps.runtime import OnnxModel
from conftest import REPO
from twinview.errors import DataError

APP = str(REPO / "apps" / "segmentation_app.py")
MARKER = "MARKER^PRIVATE-8861"  # PatientName and PatientID of the DICOM uploads
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
NON_RAS = np.array([[0.0, 0.0, -2.0, 10.0], [-1.5, 0.0, 0.0, 5.0], [0.0, 1.0, 0.0, -3.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_model(tmp_path_factory.mktemp("segapp"))


def export_tiny_model(folder: Path) -> Path:
    """A tiny 2D U-Net segmentation run exported to ``folder/seg.onnx``."""
    import torch
    from test_export import SEG_META

    from downstream.export import export_run
    from downstream.seg.config import SegModelConfig
    from downstream.seg.model import build_seg_model
    from engine.checkpoint import atomic_save
    from twinview.model_card import write_card_for

    torch.manual_seed(0)
    net = build_seg_model(SegModelConfig(arch="unet", unet_channels=[8, 16, 32]), 2, 1, 3).eval()
    atomic_save({"model": net.state_dict(), "model_config": SEG_META}, folder / "run" / "model.pt")
    write_card_for(folder / "run" / "model.pt", SEG_META, "segmentation")
    return export_run(folder / "run", folder / "seg.onnx").path


@pytest.fixture(scope="module")
def model(model_path: Path) -> OnnxModel:
    return OnnxModel(model_path)


def nifti(array: np.ndarray, affine: np.ndarray = NON_RAS) -> bytes:
    return gzip.compress(nib.Nifti1Image(array, affine).to_bytes())


def scan(shape: tuple[int, ...] = (20, 24, 9), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 30, size=shape).astype(np.float32)


def dicom_slice(series: str, k: int, pixels: np.ndarray, modality: str = "MR") -> bytes:
    """One slice of a coronal series (uint16, slope 2, intercept -100) with the marker as patient name/ID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage if modality == "MR" else CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("slice", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = MARKER, MARKER, "19010203"
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality, ds.InstanceNumber = series, modality, k + 1
    ds.ImageOrientationPatient = list(CORONAL)
    ds.ImagePositionPatient = [5.0, -3.0 - 2.5 * k, 7.0]  # the normal of CORONAL is -y (LPS)
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.7], 2.5
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.PixelData = pixels.astype("<u2").tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def dicom_series(slices: int = 5, modality: str = "MR", seed: int = 0) -> dict[str, bytes]:
    """``{member name: bytes}`` of one series, slices in shuffled order."""
    uid, rng = generate_uid(), np.random.default_rng(seed)
    order = rng.permutation(slices)
    return {f"series/IM{n:04d}": dicom_slice(uid, int(k), rng.integers(0, 400, (20, 24)), modality)
            for n, k in enumerate(order)}


def zipped(members: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if name in symlinks:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, data)
    return out.getvalue()


# --------------------------------------------------------------------------- the library


def test_a_non_ras_nifti_is_reoriented_like_training_and_its_mask_comes_back_on_its_grid(
        model: OnnxModel) -> None:
    import monai.transforms as mt
    import torch
    from monai.data import MetaTensor

    from downstream.seg.data import RAS_LABELS

    array = scan()
    volume = volumes.read_upload("scan.nii.gz", nifti(array), model.card)
    image = MetaTensor(torch.from_numpy(array[None]), affine=torch.as_tensor(NON_RAS))
    want = mt.Orientation(axcodes="RAS", labels=RAS_LABELS)(image)
    np.testing.assert_array_equal(volume.image, want.numpy())
    assert volume.ras and volume.spacing == (2.0, 1.5, 1.0) and volume.input_shape == array.shape
    np.testing.assert_allclose(volume.model_affine, want.affine.numpy())

    mask = volumes.segment_volume(model, volume)
    assert mask.shape == volume.image.shape[1:] and set(np.unique(mask)) <= {0, 1, 2}
    written = nib.Nifti1Image.from_bytes(gzip.decompress(volumes.mask_nifti_bytes(mask, volume)))
    assert written.shape == array.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, NON_RAS)
    np.testing.assert_array_equal(np.asarray(nib.as_closest_canonical(written).dataobj), mask)


def test_a_zipped_dicom_series_reads_like_the_folder_reader_and_keeps_no_patient_tags(
        model: OnnxModel, tmp_path: Path) -> None:
    from twinview.data.dicom import load_dicom_series, read_dicom_series

    members = dicom_series()
    for name, data in members.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    want, affine = load_dicom_series(read_dicom_series(tmp_path)[0])
    other = {f"small/{k}": v for k, v in dicom_series(slices=2, seed=1).items()}
    upload = zipped({**members, **other, "notes.txt": b"hello"})
    volume = volumes.read_upload("series.zip", upload, model.card)
    assert volume.note == "the zip holds 2 series; showing the largest (5 slices)"
    assert volume.modality == "MR" and volume.header is None
    np.testing.assert_allclose(volume.affine, affine)
    ornt = nib.orientations.io_orientation(affine)
    np.testing.assert_array_equal(volume.image[0], nib.orientations.apply_orientation(want, ornt))
    assert volume.image.min() >= -100 and volume.image.max() <= 2 * 399 - 100  # rescale applied
    mask = volumes.segment_volume(model, volume)
    written = nib.Nifti1Image.from_bytes(gzip.decompress(volumes.mask_nifti_bytes(mask, volume)))
    assert written.shape == want.shape
    np.testing.assert_allclose(written.affine, affine)
    assert MARKER.encode() not in pickle.dumps((volume, mask))


@pytest.mark.parametrize(("members", "symlinks", "reason"), [
    ({"../evil.dcm": b"x"}, (), "member '../evil.dcm' is a path with '..'; refusing the zip"),
    ({"/etc/evil.dcm": b"x"}, (), "member '/etc/evil.dcm' is an absolute path"),
    ({"link.dcm": b"/etc/passwd"}, ("link.dcm",), "member 'link.dcm' is a symbolic link"),
    ({f"IM{i}": b"x" for i in range(4)}, (), "4 files in the zip, over the cap of 3"),
    ({"readme.txt": b"no images here"}, (), "no DICOM files in the zip (none has the DICM marker)"),
])
def test_unsafe_or_empty_zips_are_refused(model: OnnxModel, monkeypatch: pytest.MonkeyPatch,
                                          members: dict[str, bytes], symlinks: tuple[str, ...],
                                          reason: str) -> None:
    monkeypatch.setattr(volumes, "MAX_ZIP_MEMBERS", 3)
    with pytest.raises(DataError, match="^upload.zip: ") as err:
        volumes.read_upload("upload.zip", zipped(members, symlinks), model.card)
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_a_zip_bomb_is_refused_from_its_directory_before_any_member_is_read(
        model: OnnxModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWINVIEW_MAX_UPLOAD_MB", "1")
    bomb = zipped({"IM0001": bytes(5_000_000)})
    assert len(bomb) < 1_000_000

    def no_reading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a member was read")

    monkeypatch.setattr(zipfile.ZipFile, "open", no_reading)
    with pytest.raises(DataError, match=r"^bomb.zip: unpacks to 5 MB, over the cap of 4 MB \(4 x the upload"):
        volumes.read_upload("bomb.zip", bomb, model.card)


def test_bad_uploads_are_one_line_errors_naming_the_file(model: OnnxModel,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    whole = nib.Nifti1Image(scan(), NON_RAS).to_bytes()
    rgb = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(rgb, "PNG")
    pages = io.BytesIO()
    Image.new("L", (8, 8)).save(pages, "TIFF", save_all=True, append_images=[Image.new("L", (8, 8))])
    cases = {
        ("stack.tif", pages.getvalue()): "stack.tif: 2 pages; upload a single 2D image",
        ("notes.nii", b"just some text, renamed\n" * 20): "notes.nii: not a NIfTI file (no NIfTI header)",
        ("cut.nii", whole[:2000]): "cut.nii: truncated or corrupt NIfTI",
        ("cut.nii.gz", gzip.compress(whole)[:3000]): "cut.nii.gz: truncated or corrupt gzip data",
        ("ct.zip", zipped(dicom_series(modality="CT"))):
            "ct.zip: a CT series; the model was trained on MRI (MR) images",
        ("two.nii.gz", nifti(scan((20, 24, 9, 2)))): "two.nii.gz: 2 channel(s); the model takes 1 (MRI)",
        ("colour.png", rgb.getvalue()): "colour.png: 3 channel(s); the model takes 1 (MRI)",
        ("photo.png", b"\x89PNG\r\n\x1a\n broken"): "photo.png: not a readable PNG or TIFF image",
        ("scan.mha", b"x"): "scan.mha: not a supported upload",
        ("big.nii.gz", bytes(1_500_000)): "big.nii.gz: 1.5 MB is over the upload cap of 1 MB",
    }
    monkeypatch.setenv("TWINVIEW_MAX_UPLOAD_MB", "1")
    for (name, data), reason in cases.items():
        with pytest.raises(DataError) as err:
            volumes.read_upload(name, data, model.card)
        assert str(err.value).startswith(reason) and "\n" not in str(err.value), (name, str(err.value))
    monkeypatch.setenv("TWINVIEW_MAX_UPLOAD_MB", "0.5")
    assert volumes.max_upload_bytes() == 500_000
    monkeypatch.setenv("TWINVIEW_MAX_UPLOAD_MB", "lots")
    with pytest.raises(DataError, match="TWINVIEW_MAX_UPLOAD_MB must be a positive number of megabytes"):
        volumes.max_upload_bytes()


def test_a_grey_png_is_one_2d_image_with_a_png_mask(model: OnnxModel) -> None:
    grey = np.random.default_rng(0).integers(0, 255, (40, 36), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(data, "PNG")  # an RGB file of a grey picture
    volume = volumes.read_upload("cells.png", data.getvalue(), model.card)
    assert volume.is_2d and volume.image.shape == (1, 40, 36)
    np.testing.assert_array_equal(volume.image[0], grey)
    mask = volumes.segment_volume(model, volume)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(volumes.mask_png_bytes(mask)))), mask)
    assert volumes.view_axes(volume) == {"image": -1}
    assert volumes.overlay(volume, mask, -1, 0, (0.0, 255.0), 0.5).shape == (40, 36, 3)


def test_volumes_in_ml_and_dice_on_known_masks(model: OnnxModel) -> None:
    labels = volumes.label_names(model.card)
    assert labels == {0: "background", 1: "a", 2: "b"}
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[0, 0, :4] = 1  # 4 voxels of 2 x 1.5 x 1 mm = 12 mm^3
    mask[1:3, 1:3, 1:3] = 2  # 8 voxels
    assert volumes.structure_volumes(mask, (2.0, 1.5, 1.0), labels) == [
        {"structure": "a", "voxels": 4, "volume (mL)": 0.012},
        {"structure": "b", "voxels": 8, "volume (mL)": 0.024}]
    truth = np.zeros_like(mask)
    truth[0, 0, 2:6] = 1  # 2 of 4 overlap: 2 x 2 / (4 + 4)
    assert volumes.dice_per_structure(mask, truth, labels) == {"a": 0.5, "b": 0.0}
    assert volumes.dice_per_structure(truth, truth, labels) == {"a": 1.0, "b": 1.0}  # both empty: 1


def test_a_label_file_is_read_on_the_image_grid_or_refused(model: OnnxModel) -> None:
    array = scan()
    volume = volumes.read_upload("scan.nii.gz", nifti(array), model.card)
    truth = (array > 110).astype(np.uint8)
    got = volumes.read_label("truth.nii", nib.Nifti1Image(truth, NON_RAS).to_bytes(), volume, {0: "", 1: "a"})
    np.testing.assert_array_equal(got, nib.orientations.apply_orientation(truth, volume.ornt))
    with pytest.raises(DataError, match=r"^other.nii.gz: label shape \(20, 24, 8\) differs from the image's"):
        volumes.read_label("other.nii.gz", nifti(truth[..., :8]), volume, {0: "", 1: "a"})
    with pytest.raises(DataError, match=r"^truth.nii.gz: label values \[1\] are not among the model's"):
        volumes.read_label("truth.nii.gz", nifti(truth), volume, {0: ""})


def test_window_presets_follow_the_modality(model: OnnxModel) -> None:
    volume = volumes.read_upload("scan.nii.gz", nifti(scan()), model.card)
    windows = volumes.window_presets(volume, model.card)
    assert list(windows) == list(volumes.PERCENTILE_WINDOWS)
    low, high = windows["percentiles 1-99"]
    assert (low, high) == pytest.approx(tuple(np.percentile(volume.image, [1, 99])))
    volume.modality = "CT"
    ct = volumes.window_presets(volume, model.card)
    assert ct["lung (-600/1500)"] == (-1350.0, 150.0) and ct["brain (40/80)"] == (0.0, 80.0)


def test_the_library_and_the_page_run_without_torch(model_path: Path, tmp_path: Path) -> None:
    (tmp_path / "scan.nii.gz").write_bytes(nifti(scan()))
    code = f"""
import sys
for name in ("torch", "torchvision", "monai"):
    sys.modules[name] = None
from pathlib import Path
from apps import volumes
from apps.runtime import OnnxModel
model = OnnxModel({str(model_path)!r})
volume = volumes.read_upload("scan.nii.gz", Path({str(tmp_path / "scan.nii.gz")!r}).read_bytes(), model.card)
volumes.mask_nifti_bytes(volumes.segment_volume(model, volume), volume)
import os
os.environ["TWINVIEW_SEGMENTATION_MODEL"] = {str(model_path)!r}
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({APP!r}, default_timeout=60).run()
at.file_uploader[0].upload("scan.nii.gz", Path({str(tmp_path / "scan.nii.gz")!r}).read_bytes())
at.run()
assert not at.exception and not at.error and len(at.image) == 3, (at.exception, at.error)
print(sorted(m for m, v in sys.modules.items() if v and m.split('.')[0] in ('torch', 'monai')))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stderr[-2000:]


# --------------------------------------------------------------------------- the page


def page_text(at: AppTest) -> str:
    """Everything the page rendered, as protobuf text."""
    return "\n".join(str(getattr(node, "proto", "")) for node in [*at.main, *at.sidebar])


def app(monkeypatch: pytest.MonkeyPatch, model: Path | str | None) -> AppTest:
    if model is None:
        monkeypatch.delenv("TWINVIEW_SEGMENTATION_MODEL", raising=False)
    else:
        monkeypatch.setenv("TWINVIEW_SEGMENTATION_MODEL", str(model))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def test_the_page_segments_a_nifti_and_scores_it_against_a_label_file(
        model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = app(monkeypatch, model_path)
    array = scan()
    at.file_uploader[0].upload("scan.nii.gz", nifti(array))
    at.file_uploader[1].upload("truth.nii.gz", nifti((array > 110).astype(np.uint8)))
    at.run()
    assert not at.exception and not at.error, (at.exception, at.error)
    assert [s.label for s in at.slider] == ["axial slice", "coronal slice", "sagittal slice",
                                            "Overlay opacity"]
    captions = [i.proto.imgs[0].caption for i in at.image]
    assert [c.split()[0] for c in captions] == ["axial", "coronal", "sagittal"]
    assert "Legend" in at.markdown[0].value and ">a &nbsp;" in at.markdown[0].value
    assert at.selectbox[0].options == list(volumes.PERCENTILE_WINDOWS)
    table, dice = (d.value for d in at.table)
    assert list(table["structure"]) == ["a", "b"] and "volume (mL)" in table.columns
    assert list(dice.columns) == ["structure", "Dice"] and dice["Dice"].between(0, 1).all()
    assert [b.label for b in at.get("download_button")] == ["Download the mask (.nii.gz)"]
    mask = at.session_state["segmentation"]["mask"]
    at.slider[0].set_value(3).run()  # a slider moves: the held mask is reused, the model does not run again
    assert at.session_state["segmentation"]["mask"] is mask and not at.exception


def test_the_page_shows_a_zipped_series_without_its_patient_tags(
        model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = app(monkeypatch, model_path)
    at.file_uploader[0].upload("series.zip", zipped(dicom_series()))
    at.run()
    assert not at.exception and not at.error and len(at.image) == 3, (at.exception, at.error)
    text = page_text(at)
    assert "Structures" in text and "series.zip" not in text and MARKER not in text
    assert MARKER.encode() not in pickle.dumps(at.session_state["segmentation"])


def test_bad_uploads_are_one_line_errors_on_the_page(model_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWINVIEW_MAX_UPLOAD_MB", "1")
    at = app(monkeypatch, model_path)
    cases = {("notes.nii", b"renamed text\n" * 30): "notes.nii: not a NIfTI file (no NIfTI header)",
             ("up.zip", zipped({"../up.dcm": b"x"})): "up.zip: member '../up.dcm' is a path with '..'",
             ("ct.zip", zipped(dicom_series(modality="CT"))): "ct.zip: a CT series; the model was trained on",
             ("two.nii.gz", nifti(scan((20, 24, 9, 2)))): "two.nii.gz: 2 channel(s); the model takes 1",
             ("big.nii.gz", bytes(1_500_000)): "big.nii.gz: 1.5 MB is over the upload cap of 1 MB"}
    for (name, data), reason in cases.items():
        at.file_uploader[0].set_value((name, data, "application/octet-stream"))
        at.run()
        assert not at.exception and len(at.error) == 1, (name, at.exception, at.error)
        assert at.error[0].value.startswith(reason) and "\n" not in at.error[0].value, at.error[0].value
    at.file_uploader[0].set_value(("scan.nii.gz", nifti(scan()), "application/gzip"))
    short = nifti(np.zeros((20, 24, 3), np.uint8))
    at.file_uploader[1].set_value(("short.nii.gz", short, "application/gzip"))
    at.run()
    assert not at.exception and len(at.image) == 3 and at.get("download_button")
    assert [e.value for e in at.error] == ["short.nii.gz: label shape (20, 24, 3) differs from the image's "
                                           "(20, 24, 9); upload the label file of this image"]


def test_a_missing_foreign_or_unreadable_model_is_an_error_on_the_page(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    at = app(monkeypatch, None)
    assert "make demo" in at.info[0].value and "twinview export RUN --out model.onnx" in at.info[0].value
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "foreign",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "foreign.onnx")
    (tmp_path / "text.onnx").write_text("not a model\n")
    for path, reason in [(tmp_path / "foreign.onnx", "carries no twinview model card"),
                         (tmp_path / "text.onnx", "not a readable ONNX model"),
                         (tmp_path / "gone.onnx", "no such ONNX file")]:
        at = app(monkeypatch, path)
        assert len(at.error) == 1 and at.error[0].value.startswith(f"{path}: {reason}"), at.error
        assert "\n" not in at.error[0].value and not at.file_uploader


# --------------------------------------------------------------------------- detection models


@pytest.fixture(scope="module")
def det_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_export's tiny untrained Faster R-CNN (categories 3 and 7) exported to ONNX."""
    from test_export import save_tiny_detector

    from downstream.export import export_run

    folder = tmp_path_factory.mktemp("detapp")
    save_tiny_detector(folder / "run")
    return export_run(folder / "run", folder / "det.onnx").path


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def test_boxes_are_drawn_in_their_category_colour_on_the_image_as_the_model_saw_it(det_path: Path) -> None:
    card = OnnxModel(det_path).card
    image = np.full((20, 30, 1), 51, np.uint8)  # grey: repeated to RGB, 51 / 255 -> 51
    found = {"boxes": np.array([[2.0, 3.0, 10.0, 8.0], [0.0, 0.0, 40.0, 40.0]], np.float32),
             "labels": np.array([7, 3]), "scores": np.array([0.9, 0.2], np.float32)}
    drawn = volumes.draw_detections(image, found, 0.5, card)
    colour = volumes.category_colour(card, 7)
    assert drawn.shape == (20, 30, 3) and drawn.dtype == np.uint8 and colour == volumes.label_colour(2)
    outline = np.zeros((20, 30), bool)
    outline[3:8, 2:10] = True
    outline[4:7, 3:9] = False  # a 1-pixel outline of pixels 2..9 x 3..7
    assert (drawn[outline] == colour).all() and (drawn[~outline] == 51).all()  # the 0.2 box is not drawn
    assert volumes.detection_counts(found, 0.1, card) == {"cell": 1, "debris": 1}
    assert volumes.category_names(card) == {3: "cell", 7: "debris"}
    with pytest.raises(DataError, match=r"^scan.nii.gz: a volume; the model detects in 2D images only"):
        volumes.read_detection_upload("scan.nii.gz", nifti(scan()))


def test_the_page_draws_detections_and_counts_those_above_the_score_slider(
        det_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from apps.runtime import detect

    pixels = np.random.default_rng(6).integers(0, 256, (60, 75, 3), dtype=np.uint8)
    scores = detect(OnnxModel(det_path), pixels)[2]
    at = app(monkeypatch, det_path)
    assert len(at.file_uploader) == 1  # no label file for Dice
    at.file_uploader[0].upload("cells.png", png(pixels))
    at.run()
    assert not at.exception and not at.error, (at.exception, at.error)
    assert [s.label for s in at.slider] == ["Score threshold"] and at.slider[0].value == 0.5
    assert len(at.image) == 1 and [b.label for b in at.get("download_button")] == [
        "Download the detections (.json)"]

    def shown() -> int:
        text = next(m.value for m in at.markdown if "detected with score" in m.value)
        return int(text.split("**")[1])

    counts = {}
    for threshold in (0.5, 0.05, 0.95):
        at.slider[0].set_value(threshold).run()
        assert not at.exception and not at.error
        counts[threshold] = shown()
        assert counts[threshold] == int((scores >= threshold).sum()), threshold
    assert counts[0.05] > counts[0.95] and counts[0.05] > 0
    held = at.session_state["detection"]["found"]
    at.slider[0].set_value(0.3).run()  # the slider moves: the detections are reused, the model not rerun
    assert at.session_state["detection"]["found"] is held

    at.file_uploader[0].set_value(("scan.nii.gz", nifti(scan()), "application/gzip"))
    at.run()
    assert not at.exception and len(at.error) == 1 and not at.image
    assert at.error[0].value == ("scan.nii.gz: a volume; the model detects in 2D images only: upload a PNG "
                                 "or TIFF")

    (tmp_path / "cells.png").write_bytes(png(pixels))
    code = f"""
import sys
for name in ("torch", "torchvision", "monai"):
    sys.modules[name] = None
from pathlib import Path
from apps import volumes
from apps.runtime import OnnxModel
model = OnnxModel({str(det_path)!r})
image = volumes.read_detection_upload("cells.png", Path({str(tmp_path / "cells.png")!r}).read_bytes())
found = volumes.detect_image(model, image)
assert volumes.draw_detections(image, found, 0.5, model.card).shape == (60, 75, 3)
print(len(found["scores"]), sorted(m for m, v in sys.modules.items() if v and m.split('.')[0] in ('torch',)))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(len(scores)), "[]"]
