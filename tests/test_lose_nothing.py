"""Outputs never destroy inputs or folders twinview did not write; user mistakes are one-line errors.

Regression tests for user-found data-loss and crash bugs: ``reid index`` / ``seg predict`` with ``--out``
at their input, a non-UTF-8 file name, a 2D image for a volume model, a 4D volume in ``data inspect``,
DICOM patient tags, foreign files given as weights or models, ``-k 0``, a folder that is no index,
symbolic link loops and missing model folders. Each uses hand-built tiny inputs and models.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoint import CheckpointError, atomic_save, load_checkpoint, load_payload
from tests.reader_builders import (
    SECRET_ID,
    SECRET_NAME,
    rgb,
    snapshot,
    volume,
    write_dicom_series,
    write_image,
    write_market,
    write_nifti,
)
from twinview.errors import DataError, OutputError, TwinviewError

SEG_META = {
    "arch": "unet", "encoder": "resnet18", "unet_channels": [4, 8], "spatial_dims": 3, "in_channels": 1,
    "out_channels": 3, "labels": {"0": "background", "1": "a", "2": "b"}, "task": "Toy", "kind": "msd",
    "modality": "MRI", "encoder_weights": "",
    "preprocessing": {"orientation": "RAS", "spacing": None, "normalize": "zscore",
                      "ct_window": [-175.0, 250.0], "slice_axis": 2, "roi": [8, 8, 8], "image_dims": 3},
}


def _cli(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str]:
    """Exit code of ``twinview argv`` and its stderr (what was captured before is dropped)."""
    from twinview_cli.main import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_line_error(capsys: pytest.CaptureFixture, *argv: str | Path) -> str:
    code, err = _cli(capsys, *argv)
    assert code == 2, err
    assert err.startswith("twinview: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding a tiny untrained 3D UNet ``model.pt`` (3 classes, one channel)."""
    from downstream.seg.config import SegModelConfig
    from downstream.seg.model import build_seg_model

    torch.manual_seed(0)
    model = build_seg_model(SegModelConfig(arch="unet", unet_channels=[4, 8]), 3, 1, 3)
    run = tmp_path_factory.mktemp("seg") / "run"
    atomic_save({"model": model.state_dict(), "model_config": SEG_META}, run / "model.pt")
    return run


@pytest.fixture(scope="module")
def reid_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding an untrained ResNet-18 re-ID ``model.pt`` for 32 x 16 crops."""
    from downstream.reid.model import ReIDModel

    torch.manual_seed(0)
    model = ReIDModel(0, "resnet18", 1, "avg")
    meta = {"num_classes": 0, "encoder": "resnet18", "last_stride": 1, "pooling": "avg", "size": [32, 16],
            "preprocessing": {"size": [32, 16]}}
    run = tmp_path_factory.mktemp("reid") / "run"
    atomic_save({"model": model.state_dict(), "model_config": meta}, run / "model.pt")
    return run


def _scans(folder: Path, names: tuple[str, ...] = ("a", "b")) -> Path:
    for i, name in enumerate(names):
        write_nifti(folder / f"{name}.nii.gz", volume((8, 8, 6), seed=i) + 5.0)
    return folder


def _gallery(root: Path) -> Path:
    names = {"bounding_box_test": ["0003_c2s1_000601_02.jpg", "0005_c6s2_003002_01.jpg"]}
    return write_market(root, names) / "bounding_box_test"


# --------------------------------------------------------------------------- 1. reid index --out


def test_reid_index_out_at_or_around_the_gallery_is_refused(tmp_path: Path, reid_run: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    from downstream.reid.search import index_gallery

    gallery = _gallery(tmp_path / "market")
    before = snapshot(tmp_path / "market")
    (tmp_path / "link").symlink_to(gallery)
    for out in (gallery, gallery / "idx", tmp_path / "market", tmp_path / "link"):
        with pytest.raises(OutputError, match="the input"):
            index_gallery(gallery, reid_run, out, progress=False)
        err = _one_line_error(capsys, "reid", "index", gallery, "--model", reid_run, "--out", out)
        assert "outputs never overwrite inputs" in err
    assert snapshot(tmp_path / "market") == before


def test_reid_index_never_replaces_what_twinview_did_not_write(tmp_path: Path, reid_run: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    from downstream.reid.search import index_gallery
    from twinview.index import build_index

    gallery = _gallery(tmp_path / "market")
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    (thesis / "meta.json").write_text("{}")
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF")
    for out in (thesis, report):
        for overwrite in (False, True):
            with pytest.raises(OutputError, match=str(out)):
                index_gallery(gallery, reid_run, out, progress=False, overwrite=overwrite)
            with pytest.raises(OutputError):
                build_index(np.eye(2, dtype=np.float32), [{"path": "x", "pid": 1, "camid": 1}] * 2, "m", out,
                            overwrite=overwrite)
        _one_line_error(capsys, "reid", "index", gallery, "--model", reid_run, "--out", out, "--overwrite")
    assert (thesis / "thesis.tex").read_text() == "years of work" and report.read_bytes() == b"%PDF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["market", "report.pdf", "thesis"]


def test_reid_index_is_replaced_only_with_overwrite(tmp_path: Path, reid_run: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    from downstream.reid.search import index_gallery

    gallery = _gallery(tmp_path / "market")
    index = tmp_path / "index"
    code, err = _cli(capsys, "reid", "index", gallery, "--model", reid_run, "--out", index)
    assert code == 0, err
    meta = json.loads((index / "meta.json").read_text())
    assert meta["kind"] == "twinview-reid-index" and meta["count"] == 2
    err = _one_line_error(capsys, "reid", "index", gallery, "--model", reid_run, "--out", index)
    assert "--overwrite" in err
    code, err = _cli(capsys, "reid", "index", gallery, "--model", reid_run, "--out", index, "--overwrite")
    assert code == 0, err
    # an index written before the marker existed is still recognised as one
    del meta["kind"]
    (index / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(OutputError, match="--overwrite"):
        index_gallery(gallery, reid_run, index, progress=False)
    assert index_gallery(gallery, reid_run, index, progress=False, overwrite=True)["count"] == 2
    # ... but not when something else was put into it: replacing it would delete that
    (index / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        index_gallery(gallery, reid_run, index, progress=False, overwrite=True)
    assert (index / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "market"]


# --------------------------------------------------------------------------- 2. seg predict / eval --out


def test_seg_predict_out_at_or_around_the_input_is_refused(tmp_path: Path, seg_run: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    from downstream.seg.predict import predict

    scans = _scans(tmp_path / "data" / "scans")
    before = snapshot(tmp_path / "data")
    (tmp_path / "link").symlink_to(scans)
    one = scans / "a.nii.gz"
    for inputs, out in ((scans, scans), (scans, scans / "pred"), (scans, tmp_path / "data"),
                        (scans, tmp_path / "link"), (one, one), (one, scans), (tmp_path / "link", scans)):
        for overwrite in (False, True):
            with pytest.raises(OutputError, match="the input"):
                predict(inputs, seg_run, out, overlays=False, device="cpu", overwrite=overwrite)
        _one_line_error(capsys, "seg", "predict", inputs, "--model", seg_run, "--out", out, "--device", "cpu")
    # the run folder holding the model is an input too
    with pytest.raises(OutputError, match="model.pt"):
        predict(scans, seg_run, seg_run, overlays=False, device="cpu")
    assert snapshot(tmp_path / "data") == before


def test_seg_predict_writes_own_names_and_replaces_only_its_own_folder(tmp_path: Path, seg_run: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    from downstream.seg.predict import predict

    scans = _scans(tmp_path / "scans")
    out = tmp_path / "pred"
    out.mkdir()  # an empty folder is fine
    rows = predict(scans, seg_run, out, device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.nii.gz", "b_mask.nii.gz", "overlays",
                                                       "predictions.json", "volumes.csv"]
    assert [Path(r["mask"]) for r in rows] == [out / "a_mask.nii.gz", out / "b_mask.nii.gz"]
    marker = json.loads((out / "predictions.json").read_text())
    assert marker["kind"] == "twinview-seg-predictions" and len(marker["rows"]) == 2
    with pytest.raises(OutputError, match="overwrite"):
        predict(scans, seg_run, out, overlays=False, device="cpu")
    predict(scans, seg_run, out, overlays=False, device="cpu", overwrite=True)
    assert not (out / "overlays").exists()
    # a folder or file twinview did not write is never replaced, also not with overwrite
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    (out / "notes.txt").write_text("mine")
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF")
    for target in (thesis, out, report):
        with pytest.raises(OutputError, match=str(target)):
            predict(scans, seg_run, target, overlays=False, device="cpu", overwrite=True)
        _one_line_error(capsys, "seg", "predict", scans, "--model", seg_run, "--out", target,
                        "--device", "cpu")
    assert (thesis / "thesis.tex").read_text() == "years of work" and report.read_bytes() == b"%PDF"
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred", "report.pdf", "scans", "thesis"]


def test_seg_eval_out_that_is_a_file_or_the_run_is_refused(tmp_path: Path, seg_run: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    from downstream.seg.predict import evaluate_run

    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF")
    for out, why in ((report, "not a folder"), (seg_run, "the input")):
        with pytest.raises(OutputError, match=why):
            evaluate_run(seg_run, out, device="cpu")
        _one_line_error(capsys, "seg", "eval", "--model", seg_run, "--out", out, "--device", "cpu")
    assert report.read_bytes() == b"%PDF" and sorted(p.name for p in seg_run.iterdir()) == ["model.pt"]


# --------------------------------------------------------------------------- 3. non-UTF-8 names, atomicity


def test_seg_predict_non_utf8_file_name(tmp_path: Path, seg_run: Path, capsys: pytest.CaptureFixture) -> None:
    from downstream.seg.predict import predict

    scans = tmp_path / "scans"
    name = os.fsdecode(b"scan_\xff.nii.gz")
    write_nifti(scans / name, volume((8, 8, 6)) + 5.0)
    out = tmp_path / "pred"
    rows = predict(scans, seg_run, out, device="cpu")
    assert Path(rows[0]["mask"]) == out / os.fsdecode(b"scan_\xff_mask.nii.gz")
    assert Path(rows[0]["mask"]).is_file() and (out / "overlays" / os.fsdecode(b"scan_\xff.png")).is_file()
    table = (out / "volumes.csv").read_text(encoding="utf-8")
    assert "scan_\\xff" in table and "scan_\\xff_mask.nii.gz" in table
    assert json.loads((out / "predictions.json").read_text())["rows"][0]["case"] == "scan_\\xff"
    code, err = _cli(capsys, "seg", "predict", scans, "--model", seg_run, "--out", tmp_path / "cli",
                     "--device", "cpu")
    assert code == 0, err


def test_seg_predict_failure_leaves_no_half_written_folder(tmp_path: Path, seg_run: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import downstream.seg.predict as seg_predict

    scans = _scans(tmp_path / "scans")
    real = seg_predict.save_overlay
    calls = []

    def fail_on_second(*args: object, **kwargs: object) -> Path:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(seg_predict, "save_overlay", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        seg_predict.predict(scans, seg_run, tmp_path / "new", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scans"]  # nothing half-written
    monkeypatch.undo()
    out = tmp_path / "pred"
    seg_predict.predict(scans, seg_run, out, device="cpu")
    before = snapshot(out)
    calls.clear()
    monkeypatch.setattr(seg_predict, "save_overlay", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        seg_predict.predict(scans, seg_run, out, device="cpu", overwrite=True)
    assert snapshot(out) == before  # the earlier output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred", "scans"]


# --------------------------------------------------------------------------- 4. a 2D image for a volume model


def test_2d_image_for_a_volume_model_says_so(tmp_path: Path, seg_run: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    from downstream.seg.predict import predict

    image = write_image(tmp_path / "photos" / "cell.png", rgb(16, 16))
    for inputs in (image, image.parent):
        with pytest.raises(DataError, match=r"cell\.png: a 2D image; the model segments 3D volumes"):
            predict(inputs, seg_run, tmp_path / "pred", device="cpu")
        err = _one_line_error(capsys, "seg", "predict", inputs, "--model", seg_run, "--out",
                              tmp_path / "pred", "--device", "cpu")
        assert "a 2D image; the model segments 3D volumes" in err
    assert not (tmp_path / "pred").exists()


# --------------------------------------------------------------------------- 5. 4D volumes in data inspect


def test_inspect_reports_the_full_shape_of_4d_volumes(tmp_path: Path) -> None:
    from twinview.data.inspect import inspect_path

    write_nifti(tmp_path / "vols" / "three.nii.gz", volume((6, 5, 4)))
    write_nifti(tmp_path / "vols" / "four.nii.gz", volume((6, 5, 4, 2)))
    report = inspect_path(tmp_path / "vols")
    assert (report["shape_min"], report["shape_max"]) == ([6, 5, 4, 1], [6, 5, 4, 2])
    assert report["channels"] == {"1": 1, "2": 1} and report["problems"] == []
    single = inspect_path(tmp_path / "vols" / "four.nii.gz")
    assert single["shape_min"] == single["shape_max"] == [6, 5, 4, 2] and single["channels"] == {"2": 1}
    (tmp_path / "vols" / "four.nii.gz").unlink()
    plain = inspect_path(tmp_path / "vols")
    assert plain["shape_max"] == [6, 5, 4] and plain["channels"] == {"1": 1}


# --------------------------------------------------------------------------- 6. DICOM patient tags


def test_dicom_patient_tags_are_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom

    from twinview.data import dicom
    from twinview.data.inspect import inspect_path

    write_dicom_series(tmp_path / "dicom", slices=3)
    files = dicom.dicom_files(tmp_path / "dicom")
    assert str(pydicom.dcmread(files[0]).PatientName) == SECRET_NAME  # they are in the files
    datasets = []
    real = pydicom.dcmread

    def spy(*args: object, **kwargs: object) -> pydicom.Dataset:
        datasets.append(real(*args, **kwargs))
        return datasets[-1]

    monkeypatch.setattr(pydicom, "dcmread", spy)
    record = dicom.read_dicom_series(tmp_path / "dicom")[0]
    volume_, _ = dicom.load_dicom_series(record)
    report = inspect_path(tmp_path / "dicom")
    assert volume_.shape == (3, 2, 3) and report["series"] == 1 and report["problems"] == []
    assert len(datasets) >= 2 * len(files)  # headers and pixels were read through the spy
    for ds in datasets:
        for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
            assert keyword not in ds
        assert SECRET_NAME not in str(ds) and SECRET_ID not in str(ds)


# --------------------------------------------------------------------------- 7a. foreign weights and models


def _foreign_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(torch.zeros(3), folder / "tensor.pt")
    with open(folder / "plain.pkl", "wb") as fh:
        pickle.dump({"a": 1}, fh)
    atomic_save({"w": torch.randn(1000)}, folder / "cut.pt")
    (folder / "cut.pt").write_bytes((folder / "cut.pt").read_bytes()[:300])
    return {name: folder / name for name in ("tensor.pt", "plain.pkl", "cut.pt")}


def _assert_clean(err: BaseException, path: Path) -> None:
    text = str(err)
    assert str(path) in text and "\n" not in text, text
    assert "weights_only" not in text and "Unpickler" not in text, text


def test_checkpoint_errors_name_the_file_in_one_line(tmp_path: Path) -> None:
    files = _foreign_files(tmp_path)
    for name in ("plain.pkl", "cut.pt"):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(files[name])
        assert isinstance(info.value, DataError) and isinstance(info.value, RuntimeError)
        _assert_clean(info.value, files[name])
    assert "truncated or not a torch file" in str(info.value)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    for path in files.values():
        with pytest.raises(DataError, match="not a twinview encoder file") as info:
            load_payload(path, ("encoder", "encoder_config"), "encoder")
        _assert_clean(info.value, path)
    atomic_save({"encoder": {}, "encoder_config": {}}, tmp_path / "encoder.pt")
    alternatives = [("model", "model_config"), ("encoder", "encoder_config")]
    assert set(load_payload(tmp_path / "encoder.pt", alternatives, "re-ID model")) == {"encoder",
                                                                                      "encoder_config"}
    with pytest.raises(DataError, match=r"not a twinview segmentation model file: it holds encoder, "):
        load_payload(tmp_path / "encoder.pt", ("model", "model_config"), "segmentation model")


def test_foreign_files_as_encoder_or_model_are_one_line_errors(tmp_path: Path, seg_run: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    from downstream.seg.evaluate import load_model
    from pretrain.encoders import build_encoder, load_encoder_file

    scans = _scans(tmp_path / "scans")
    target = build_encoder("resnet18", 1, 2)
    expected = {"name": "resnet18", "spatial_dims": 2, "in_channels": 1, "small_stem": False}
    for path in _foreign_files(tmp_path / "foreign").values():
        with pytest.raises(DataError, match="not a twinview encoder file") as info:
            load_encoder_file(path, target, expected)
        _assert_clean(info.value, path)
        with pytest.raises(DataError, match="not a twinview segmentation model file") as info:
            load_model(path)
        _assert_clean(info.value, path)
        err = _one_line_error(capsys, "seg", "predict", scans, "--model", path, "--out", tmp_path / "p",
                              "--device", "cpu")
        assert "weights_only" not in err
        _one_line_error(capsys, "seg", "eval", "--model", path, "--out", tmp_path / "e", "--device", "cpu")
    # a re-ID model is no segmentation model either
    atomic_save({"model": {}, "model_config": {"num_classes": 0, "size": [32, 16]}}, tmp_path / "reid.pt")
    with pytest.raises(DataError, match="lacks"):
        load_model(tmp_path / "reid.pt")


# --------------------------------------------------------------------------- 7c, 7d. reid query


def test_query_with_k_zero_is_refused_before_loading_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    import downstream.reid.search as search
    from twinview.index import build_index

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(search, "load_reid_model", no_model)
    image = write_image(tmp_path / "q.jpg", rgb())
    index = build_index(np.eye(2, dtype=np.float32), [{"path": "g.jpg", "pid": 1, "camid": 1}] * 2, "m",
                        tmp_path / "index", extra={"model_path": str(tmp_path / "m.pt"), "size": [32, 16],
                                                    "flip": True})
    for k in (0, -3):
        with pytest.raises(DataError, match="-k"):
            search.query_index(index, image, k=k)
        assert "-k" in _one_line_error(capsys, "reid", "query", index, image, "-k", str(k))


def test_a_folder_that_is_no_index_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from twinview.index import IndexFileError, IndexModelMismatch, load_index

    assert issubclass(IndexFileError, DataError) and issubclass(IndexModelMismatch, DataError)
    image = write_image(tmp_path / "q.jpg", rgb())
    (tmp_path / "plain").mkdir()
    for folder in (tmp_path / "plain", tmp_path / "missing", image):
        with pytest.raises(IndexFileError, match=str(folder)):
            load_index(folder)
        _one_line_error(capsys, "reid", "query", folder, image)


# --------------------------------------------------------------------------- 7e. symbolic link loops


def test_symbolic_link_loops_are_named(tmp_path: Path, seg_run: Path, reid_run: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    from downstream.reid.search import gallery_records, index_gallery
    from downstream.seg.predict import predict
    from twinview.data.inspect import inspect_path

    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    deeper = tmp_path / "ring_a"
    deeper.symlink_to(tmp_path / "ring_b")
    (tmp_path / "ring_b").symlink_to(deeper)
    for path in (loop, deeper):
        for call in (lambda p: inspect_path(p), lambda p: gallery_records(p),
                     lambda p: index_gallery(p, reid_run, tmp_path / "idx", progress=False),
                     lambda p: predict(p, seg_run, tmp_path / "pred", device="cpu")):
            with pytest.raises(DataError, match="symbolic link loop"):
                call(path)
        for argv in (("data", "inspect", path),
                     ("reid", "index", path, "--model", reid_run, "--out", tmp_path / "idx"),
                     ("seg", "predict", path, "--model", seg_run, "--out", tmp_path / "pred",
                      "--device", "cpu")):
            assert "symbolic link loop" in _one_line_error(capsys, *argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop", "ring_a", "ring_b"]


# --------------------------------------------------------------------------- 7f. missing model folders


def test_missing_model_folder_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from downstream.reid.search import index_gallery
    from downstream.seg.evaluate import load_model
    from downstream.seg.predict import predict

    scans = _scans(tmp_path / "scans")
    gallery = _gallery(tmp_path / "market")
    missing = tmp_path / "no_run"
    with pytest.raises(DataError, match="no_run: no such run folder"):
        load_model(missing)
    with pytest.raises(DataError, match="no_run"):
        predict(scans, missing, tmp_path / "pred", device="cpu")
    with pytest.raises(DataError, match="no_run"):
        index_gallery(gallery, missing, tmp_path / "idx", progress=False)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty_run/model\.pt: no trained model"):
        load_model(empty)
    for argv in (("seg", "predict", scans, "--model", missing, "--out", tmp_path / "pred", "--device", "cpu"),
                 ("seg", "eval", "--model", missing, "--out", tmp_path / "ev", "--device", "cpu"),
                 ("reid", "index", gallery, "--model", missing, "--out", tmp_path / "idx")):
        assert "no_run" in _one_line_error(capsys, *argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty_run", "market", "scans"]


def test_reid_eval_with_a_missing_model_folder_is_a_one_line_error(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """``reid eval`` loads through ``downstream.reid.evaluate`` (the lead's): CLI level only."""
    data = write_market(tmp_path / "market")
    err = _one_line_error(capsys, "reid", "eval", "--model", tmp_path / "no_run", "--data", data, "--out",
                          tmp_path / "ev", "--device", "cpu")
    assert "no_run" in err
    assert issubclass(CheckpointError, TwinviewError)
