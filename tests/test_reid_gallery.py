"""Re-ID on the user's own crops: folders of images and CSV files for ``reid eval``, ``index`` and
``query`` (scores against the Market-1501 path, camera rule, no ids, bad input)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.reader_builders import rgb, write_image
from twinview.data.market1501 import GALLERY, QUERY, parse_market_name
from twinview.data.person_folder import read_person_csv, read_person_folder, read_person_source
from twinview.data.records import PersonRecord
from twinview.errors import DataError, OutputError
from twinview_cli.main import main

MARKET = {  # query 0003 has only a same-camera match: skipped when cameras count
    "bounding_box_train": ["0001_c1s1_000001_01.jpg"],
    QUERY: ["0001_c1s1_000101_01.jpg", "0002_c1s1_000201_01.jpg", "0003_c2s1_000301_01.jpg"],
    GALLERY: ["0001_c2s1_000111_01.jpg", "0001_c3s1_000121_01.jpg", "0002_c3s1_000211_01.jpg",
              "0003_c2s1_000311_01.jpg", "0000_c4s1_000001_01.jpg", "0004_c1s1_000401_01.jpg",
              "-1_c1s1_000002_01.jpg"],
}


@pytest.fixture(scope="module")
def reid_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding an untrained ResNet-18 re-ID ``model.pt`` for 32 x 16 crops."""
    from downstream.reid.model import ReIDModel
    from engine.checkpoint import atomic_save

    torch.manual_seed(0)
    model = ReIDModel(0, "resnet18", 1, "avg")
    meta = {"num_classes": 0, "encoder": "resnet18", "last_stride": 1, "pooling": "avg", "size": [32, 16],
            "preprocessing": {"size": [32, 16]}}
    run = tmp_path_factory.mktemp("reid") / "run"
    atomic_save({"model": model.state_dict(), "model_config": meta}, run / "model.pt")
    return run


def _market(root: Path) -> Path:
    """A Market-1501 folder of the :data:`MARKET` names, every crop different."""
    crops = [(split, name) for split, names in MARKET.items() for name in names]
    for i, (split, name) in enumerate(crops):
        write_image(root / split / name, rgb(16, 8, seed=i))
    return root


def _csv(path: Path, header: str, rows: list[tuple]) -> Path:
    path.write_text("\n".join([header, *(",".join(str(c) for c in row) for row in rows)]) + "\n")
    return path


def _market_csv(tmp_path: Path, split: str, cameras: bool) -> Path:
    """A CSV of the kept crops of one split of :func:`_market` at ``tmp_path / "market"``."""
    rows = []
    for name in sorted(MARKET[split]):
        pid, camid, _, _ = parse_market_name(name)
        if pid != -1:
            rows.append((f"market/{split}/{name}", pid, *([camid] if cameras else [])))
    header = "path,person_id,camera" if cameras else "path,person_id"
    return _csv(tmp_path / f"{split}{'_cams' if cameras else ''}.csv", header, rows)


def _crops(folder: Path) -> Path:
    """Three crops without ids, one in a subfolder, plus a file that is no image."""
    for i, name in enumerate(("anna.jpg", "ben.png", "sub/carl.jpg")):
        write_image(folder / name, rgb(16, 8, seed=10 + i))
    (folder / "notes.txt").write_text("not an image")
    return folder


def _eval(run: Path, out: Path, *source: str | Path, capsys: pytest.CaptureFixture) -> str:
    """What ``twinview reid eval`` prints for ``--data M`` or ``--query Q --gallery G``."""
    flags = ["--data", *source] if len(source) == 1 else ["--query", source[0], "--gallery", source[1]]
    capsys.readouterr()
    assert main(["reid", "eval", "--model", str(run), "--out", str(out), "--device", "cpu",
                 *map(str, flags)]) == 0
    return capsys.readouterr().out


# --------------------------------------------------------------------------- scores


def test_a_csv_with_ids_and_cameras_scores_like_the_market_folder(tmp_path: Path, reid_run: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    market = _market(tmp_path / "market")
    _eval(reid_run, tmp_path / "ev_market", market, capsys=capsys)
    printed = _eval(reid_run, tmp_path / "ev_csv", _market_csv(tmp_path, QUERY, True),
                    _market_csv(tmp_path, GALLERY, True), capsys=capsys)
    assert "| Rank-1 |" in printed and f"CMC curve: {tmp_path / 'ev_csv' / 'cmc_curve.png'}" in printed
    by_market = json.loads((tmp_path / "ev_market" / "eval.json").read_text())
    by_csv = json.loads((tmp_path / "ev_csv" / "eval.json").read_text())
    assert by_csv == by_market
    # 6 gallery crops (junk dropped), the distractor kept; 0003's same-camera match is ignored
    assert (by_csv["queries"], by_csv["gallery"], by_csv["skipped_queries"]) == (3, 6, 1)
    assert len(by_csv["cmc"]) == 50 and by_csv["cmc"][-1] == 1.0  # a gallery of 6 still has rank 50
    assert (tmp_path / "ev_csv" / "top10.png").stat().st_size > 0


def test_without_cameras_same_camera_matches_count(tmp_path: Path, reid_run: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    _market(tmp_path / "market")
    query, gallery = _market_csv(tmp_path, QUERY, False), _market_csv(tmp_path, GALLERY, False)
    _eval(reid_run, tmp_path / "ev", query, gallery, capsys=capsys)
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert (result["queries"], result["skipped_queries"]) == (3, 0)  # 0003 now has its match
    # cameras on one side only: still not used
    _eval(reid_run, tmp_path / "ev_one", _market_csv(tmp_path, QUERY, True),
          _market_csv(tmp_path, GALLERY, False), capsys=capsys)
    assert json.loads((tmp_path / "ev_one" / "eval.json").read_text())["skipped_queries"] == 0


def test_an_image_in_both_sets_never_matches_itself(tmp_path: Path, reid_run: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    from downstream.reid.evaluate import evaluate_run

    for i, name in enumerate(("a", "b", "c")):
        write_image(tmp_path / "imgs" / f"{name}.png", rgb(16, 8, seed=i))
    every = _csv(tmp_path / "imgs" / "all.csv", "path,person_id", [("a.png", 1), ("b.png", 1), ("c.png", 2)])
    _eval(reid_run, tmp_path / "ev", every, every, capsys=capsys)
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert (result["queries"], result["skipped_queries"]) == (3, 1)  # c has no other image of person 2
    same_camera = _csv(tmp_path / "cams.csv", "path,person_id,camera",
                       [("imgs/a.png", 1, 1), ("imgs/b.png", 1, 1), ("imgs/c.png", 2, 1)])
    with pytest.raises(DataError, match="no query has a true match in the gallery"):
        evaluate_run(reid_run, None, tmp_path / "ev_cams", device="cpu", query=same_camera,
                     gallery=same_camera)
    assert not (tmp_path / "ev_cams").exists()


def test_protocol_ids_ignore_only_the_same_file_without_cameras(tmp_path: Path) -> None:
    from downstream.reid.evaluate import protocol_ids

    files = [write_image(tmp_path / f"{n}.png", rgb(seed=i)) for i, n in enumerate("abc")]
    (tmp_path / "link.png").symlink_to(files[0])
    query = [PersonRecord(f, pid, None, None, None, QUERY) for f, pid in zip(files, (-4, -4, 0), strict=True)]
    gallery = [*query, PersonRecord(tmp_path / "link.png", -4, None, None, None, GALLERY)]
    q_pids, g_pids, q_cams, g_cams = protocol_ids(query, gallery)
    ignored = (q_pids[:, None] == g_pids[None]) & (q_cams[:, None] == g_cams[None])
    assert ignored.tolist() == [[True, False, False, True], [False, True, False, False],
                                [False, False, True, False]]
    assert sorted(set(g_pids.tolist())) == [1, 2]  # -4 and 0 are plain labels, not junk or distractors
    with_cams = [PersonRecord(f, 3, c, None, None, GALLERY) for f, c in zip(files, (1, 1, 2), strict=True)]
    q_pids, g_pids, q_cams, g_cams = protocol_ids(with_cams, with_cams)
    ignored = (q_pids[:, None] == g_pids[None]) & (q_cams[:, None] == g_cams[None])
    assert ignored.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    other_id = [PersonRecord(files[0], 9, None, None, None, GALLERY)]
    with pytest.raises(DataError, match=r"a\.png: person -4 in the query set, person 9 in the gallery"):
        protocol_ids(query, other_id)


# --------------------------------------------------------------------------- no ids


def test_a_folder_without_ids_is_not_scored_but_indexed_and_queried(tmp_path: Path, reid_run: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from downstream.reid.evaluate import evaluate_run

    crops = _crops(tmp_path / "crops")
    records = read_person_folder(crops)
    assert [r.path.relative_to(crops).as_posix() for r in records] == ["anna.jpg", "ben.png", "sub/carl.jpg"]
    assert {(r.pid, r.camid) for r in records} == {(None, None)}
    printed = _eval(reid_run, tmp_path / "ev", crops, crops, capsys=capsys)
    assert "No identities given for the query set and the gallery: nothing to score" in printed
    assert "CMC curve" not in printed
    assert (tmp_path / "ev" / "top10.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["eval.md", "top10.png"]
    with pytest.raises(OutputError, match="lies inside the input"):  # its top10.png would become a crop
        evaluate_run(reid_run, None, crops / "sub" / "ev", device="cpu", query=crops, gallery=crops)

    index = tmp_path / "idx"
    assert main(["reid", "index", str(crops), "--model", str(reid_run), "--out", str(index)]) == 0
    meta = json.loads((index / "meta.json").read_text())
    assert meta["count"] == 3 and meta["pids"] == [None] * 3 and meta["camids"] == [None] * 3
    capsys.readouterr()
    assert main(["reid", "query", str(index), str(crops / "ben.png"), "-k", "2"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(hits) == 2 and all(h["pid"] is None and h["camid"] is None for h in hits)
    assert {h["path"] for h in hits} <= set(meta["paths"])


def test_an_index_of_a_csv_keeps_its_ids_and_cameras(tmp_path: Path, reid_run: Path) -> None:
    from downstream.reid.search import index_gallery

    _market(tmp_path / "market")
    for cameras in (True, False):
        out = tmp_path / f"idx_{cameras}"
        index_gallery(_market_csv(tmp_path, GALLERY, cameras), reid_run, out, progress=False)
        meta = json.loads((out / "meta.json").read_text())
        assert meta["pids"] == [0, 1, 1, 2, 3, 4]
        assert meta["camids"] == ([4, 2, 3, 3, 2, 1] if cameras else [None] * 6)
        assert meta["paths"][0].endswith("0000_c4s1_000001_01.jpg")
    with pytest.raises(OutputError, match="the input"):  # never inside a folder of the CSV's images
        index_gallery(tmp_path / f"{GALLERY}.csv", reid_run, tmp_path / "market" / GALLERY / "idx",
                      progress=False)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize(("text", "line", "reason"), [
    ("path,person_id\na.jpg,1\nmissing.jpg,2\n", 3, "missing.jpg: no such file"),
    ("path,person_id\na.jpg,one\n", 2, "person_id 'one' is not an integer"),
    ("path,person_id,camera\na.jpg,1,c2\n", 2, "camera 'c2' is not an integer"),
    ("path,person_id,camera\na.jpg,1,2\nb.jpg,1\n", 3, "2 columns, the header path,person_id,camera has 3"),
    ("path,person_id\na.jpg,1,2\n", 2, "3 columns"),
    ("path,person_id,camera\na.jpg,1,2\nb.jpg,1,\n", 3, "no camera: every row needs every column"),
    ("path,person_id\na.jpg,1\n./a.jpg,2\n", 3, "a.jpg is listed already on line 2"),
    ("path,person_id\n\nb.jpg,1\nsub,2\n", 4, "sub: not a file"),
    ("path,person_id\nnotes.txt,1\n", 2, "notes.txt: not an image file"),
    ("a.jpg,1\nb.jpg,2\n", 1, "the CSV must start with the header path,person_id[,camera]"),
])
def test_each_bad_csv_line_is_named(tmp_path: Path, text: str, line: int, reason: str) -> None:
    for i, name in enumerate(("a.jpg", "b.jpg")):
        write_image(tmp_path / name, rgb(seed=i))
    (tmp_path / "sub").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    csv_file = tmp_path / "list.csv"
    csv_file.write_text(text)
    with pytest.raises(DataError) as err:
        read_person_csv(csv_file)
    assert str(err.value).startswith(f"{csv_file}: line {line}: ") and reason in str(err.value)


def test_a_good_csv_reads_absolute_and_relative_paths(tmp_path: Path) -> None:
    image = write_image(tmp_path / "imgs" / "a.jpg", rgb())
    other = write_image(tmp_path / "elsewhere" / "b.png", rgb(seed=1))
    csv_file = tmp_path / "imgs" / "list.csv"
    csv_file.write_text(f"\ufeffpath,person_id\r\na.jpg,7\r\n{other},-2\r\n\r\n",  # BOM, CRLF, blank end
                        encoding="utf-8")
    records = read_person_csv(csv_file, QUERY)
    assert [(r.path, r.pid, r.camid, r.split) for r in records] == [(image, 7, None, QUERY),
                                                                    (other, -2, None, QUERY)]


@pytest.mark.parametrize(("text", "reason"), [("", "empty CSV"), ("\n\n", "empty CSV"),
                                              ("path,person_id\n", "no rows below the header")])
def test_an_empty_csv_is_named(tmp_path: Path, text: str, reason: str) -> None:
    csv_file = tmp_path / "list.csv"
    csv_file.write_text(text)
    with pytest.raises(DataError, match=f"^{re.escape(str(csv_file))}: {reason}"):
        read_person_csv(csv_file)


def test_a_csv_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    csv_file = tmp_path / "list.csv"
    csv_file.write_bytes(b"path,person_id\ncaf\xe9.jpg,1\n")  # Latin-1, as some spreadsheets save
    with pytest.raises(DataError, match=f"^{re.escape(str(csv_file))}: not UTF-8 text"):
        read_person_csv(csv_file)


def test_bad_folders_and_paths_are_named(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    write_image(mixed / "0001_c1s1_000101_01.jpg", rgb())
    write_image(mixed / "holiday.jpg", rgb(seed=1))
    (tmp_path / "empty").mkdir()
    market = _market(tmp_path / "market")
    (tmp_path / "list.txt").write_text("a.jpg,1\n")
    for path, reason in [(mixed, "holiday.jpg: name does not match PPPP_cCsS_FFFFFF_BB.jpg"),
                         (tmp_path / "empty", "empty: no images"),
                         (market, "market: a Market-1501 folder: give its query/ or bounding_box_test/"),
                         (tmp_path / "list.txt", "list.txt: neither a folder nor a .csv file"),
                         (tmp_path / "nowhere.csv", "nowhere.csv: no such folder or .csv file")]:
        with pytest.raises(DataError) as err:
            read_person_source(path)
        assert reason in str(err.value)
    # a folder of Market-1501 names keeps its ids; junk is dropped, a distractor query refused
    records = read_person_source(market / GALLERY)
    assert [(r.pid, r.camid) for r in records][:2] == [(0, 4), (1, 2)] and len(records) == 6
    write_image(market / QUERY / "0000_c1s1_000009_01.jpg", rgb())
    with pytest.raises(DataError, match="distractor"):
        read_person_source(market / QUERY, QUERY)


def test_an_unreadable_image_stops_eval_and_index_with_its_name(tmp_path: Path, reid_run: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    crops = _crops(tmp_path / "crops")
    (crops / "sub" / "broken.jpg").write_bytes(b"not a jpeg at all")
    csv_file = _csv(tmp_path / "list.csv", "path,person_id",
                    [("crops/anna.jpg", 1), ("crops/sub/broken.jpg", 1)])
    eval_csv = ["reid", "eval", "--query", csv_file, "--gallery", crops, "--device", "cpu"]
    for argv, out in [(["reid", "index", crops], tmp_path / "idx"),
                      (["reid", "index", csv_file], tmp_path / "idx"), (eval_csv, tmp_path / "ev")]:
        capsys.readouterr()
        assert main([*map(str, argv), "--model", str(reid_run), "--out", str(out)]) == 2
        err = capsys.readouterr().err  # after the progress bar, which has started
        assert f"twinview: error: {crops / 'sub' / 'broken.jpg'}: not a readable image" in err
        assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("forms", [[], ["--data", "m", "--query", "q", "--gallery", "g"], ["--query", "q"],
                                   ["--gallery", "g"], ["--data", "m", "--gallery", "g"]])
def test_eval_takes_one_form_of_data(forms: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["reid", "eval", "--model", "run", "--out", "out", *forms])
    assert exit_.value.code == 2
    assert "give --data MARKET_FOLDER, or --query PATH and --gallery PATH" in capsys.readouterr().err

