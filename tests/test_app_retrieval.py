"""The retrieval app: its library (apps/gallery.py) held to the re-ID evaluation, and the page via AppTest.

One tiny re-ID network exported once per module; the synthetic Market-1501 folder as the data.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apps import gallery as lib
from apps.gallery import Gallery, decode_upload, load_model, model_id, read_rgb
from apps.runtime import OnnxModel, embed
from conftest import REPO
from twinview.data.market1501 import GALLERY, QUERY, read_split
from twinview.errors import DataError
from twinview.index import IndexModelMismatch, build_index
from twinview.retrieval import market1501_scores, pairwise_distance

APP = str(REPO / "apps" / "retrieval_app.py")


@pytest.fixture(scope="module")
def reid(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A small untrained re-ID network (resnet18, 64 x 32 crops) and its ONNX export."""
    return export_tiny_model(tmp_path_factory.mktemp("reid"))


def export_tiny_model(tmp: Path) -> tuple[torch.nn.Module, Path]:
    """An untrained re-ID run (resnet18, 64 x 32 crops) exported to ``tmp/reid.onnx``."""
    from downstream.export import export_run
    from downstream.reid.model import ReIDModel
    from engine.checkpoint import atomic_save
    from pretrain.views import preset_metadata
    from twinview.model_card import write_card_for

    torch.manual_seed(0)
    net = ReIDModel(4, "resnet18", last_stride=1, pooling="avg").eval()
    meta = {"encoder": "resnet18", "last_stride": 1, "pooling": "avg", "num_classes": 4, "size": [64, 32],
            "source": "reid", "encoder_weights": "", "preprocessing": preset_metadata("reid", (64, 32))}
    atomic_save({"model": net.state_dict(), "model_config": meta}, tmp / "run" / "model.pt")
    write_card_for(tmp / "run" / "model.pt", meta, "reid")
    return net, export_run(tmp / "run", tmp / "reid.onnx").path


@pytest.fixture(scope="module")
def model(reid: tuple[torch.nn.Module, Path]) -> OnnxModel:
    return load_model(reid[1])


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's index cache: the Market folder is embedded and mapped once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def cache(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The module's cache, also for the app (which opens galleries with the default cache)."""
    monkeypatch.setattr(lib, "CACHE_ROOT", shared_cache)
    return shared_cache


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def files_below(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


# --------------------------------------------------------------------------- the library


def test_flip_averaging_matches_the_re_id_evaluation(reid: tuple[torch.nn.Module, Path], model: OnnxModel,
                                                     synth_market: Path) -> None:
    from downstream.reid.evaluate import extract

    paths = sorted((synth_market / QUERY).iterdir())[:5]
    want = extract(reid[0], paths, [64, 32], torch.device("cpu"), flip=True)
    got = embed(model, [read_rgb(p) for p in paths], flip=True)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert not np.allclose(got, embed(model, [read_rgb(p) for p in paths]), atol=1e-4)


def test_a_market_folder_scores_like_the_protocol_on_direct_embeddings(model: OnnxModel, synth_market: Path,
                                                                       cache: Path) -> None:
    before = files_below(synth_market)
    gallery = Gallery.open(synth_market, model, cache=cache)
    assert gallery.ids_known and gallery.flip and len(gallery.queries) == len(read_split(synth_market, QUERY))
    meta = gallery.index.meta
    assert all(Path(p).parent.name == GALLERY for p in meta["paths"]) and -1 not in meta["pids"]
    g = embed(model, [read_rgb(p) for p in meta["paths"]], flip=True)
    q = embed(model, [read_rgb(e.path) for e in gallery.queries], flip=True)
    want = market1501_scores(pairwise_distance(q, g, normalized=True), [e.pid for e in gallery.queries],
                             meta["pids"], [e.camid for e in gallery.queries], meta["camids"])
    got = gallery.scores()
    assert got is not None and got.num_valid == want.num_valid
    assert float(got.cmc[0]) == pytest.approx(float(want.cmc[0])) and got.mAP == pytest.approx(want.mAP)
    assert files_below(synth_market) == before  # nothing written into the user's folder
    assert gallery.index.path.parent == cache
    written = files_below(cache)
    again = Gallery.open(synth_market, model, cache=cache)  # the cached index is reused
    assert again.index.path == gallery.index.path and files_below(cache) == written

    result = gallery.search(gallery.query(0), k=7)
    assert [h.rank for h in result.hits] == list(range(1, 8))
    assert result.query.pid == gallery.queries[0].pid and result.verdict(result.hits[0]) is not None
    figure = gallery.map_figure(result)
    assert figure is not None and len(figure.axes) == 1


def test_a_plain_folder_has_no_ids_and_is_searched_by_uploads(model: OnnxModel, synth_market: Path,
                                                              tmp_path: Path) -> None:
    folder = tmp_path / "crops"  # ids are not read from names unless all are Market-1501 names
    (folder / "sub").mkdir(parents=True)
    sources = sorted((synth_market / GALLERY).iterdir())[:12]
    for i, src in enumerate(sources):
        shutil.copy(src, folder / ("sub" if i % 2 else "") / f"person{i}.jpg")
    gallery = Gallery.open(folder, model, cache=tmp_path / "cache")
    assert len(gallery) == 12 and not gallery.ids_known and gallery.queries == []
    assert gallery.scores() is None
    query = gallery.upload(png(read_rgb(folder / "person0.jpg")), "me.png")
    result = gallery.search(query, k=3)
    assert Path(result.hits[0].path).name == "person0.jpg" and result.hits[0].score > 0.99
    assert result.hits[0].pid is None and result.verdict(result.hits[0]) is None
    assert gallery.map_figure(result) is not None


def test_a_csv_gallery_brings_its_ids_and_a_changed_id_is_embedded_again(model: OnnxModel, synth_market: Path,
                                                                        tmp_path: Path) -> None:
    """The app reads galleries as the command line does: a CSV gives ids (cameras optional), a folder
    mixing Market-1501 names with others is refused naming the odd file."""
    crops = tmp_path / "crops"
    crops.mkdir()
    sources = sorted((synth_market / GALLERY).iterdir())[4:10]
    for i, src in enumerate(sources):
        shutil.copy(src, crops / f"person{i}.jpg")
    listing = tmp_path / "lists" / "ids.csv"
    listing.parent.mkdir()
    rows = "".join(f"../crops/person{i}.jpg,{7 + i % 2}\n" for i in range(6))
    listing.write_text("path,person_id\n" + rows)
    cache = tmp_path / "cache"
    gallery = Gallery.open(listing, model, cache=cache)
    assert gallery.ids_known and not gallery.cameras_known and gallery.queries == []
    assert gallery.index.meta["pids"] == [7, 8, 7, 8, 7, 8] and gallery.scores() is None
    assert "identities, no cameras" in gallery.describe()
    hit = gallery.search(gallery.upload(png(read_rgb(crops / "person3.jpg")), "me.png"), k=1).hits[0]
    assert Path(hit.path).name == "person3.jpg" and hit.pid == 8 and hit.camid is None

    rows = "".join(f"../crops/person{i}.jpg,{i},{i % 3}\n" for i in range(6))
    listing.write_text("path,person_id,camera\n" + rows)
    again = Gallery.open(listing, model, cache=cache)  # same files, other ids: not the stale cache
    assert again.index.path != gallery.index.path and again.cameras_known
    assert again.index.meta["pids"] == list(range(6)) and again.index.meta["camids"] == [0, 1, 2, 0, 1, 2]

    listing.write_text("path,person_id\n../crops/person0.jpg,seven\n")
    with pytest.raises(DataError, match=r"ids.csv.*line 2.*integer"):
        Gallery.open(listing, model, cache=cache)
    shutil.copy(sources[0], crops / sources[0].name)  # one Market-1501 name among plain names
    with pytest.raises(DataError, match="person0.jpg: name does not match"):
        Gallery.open(crops, model, cache=cache)


def test_a_saved_index_brings_its_flip_setting_and_the_sibling_query_set(model: OnnxModel, synth_market: Path,
                                                                        tmp_path: Path) -> None:
    records = read_split(synth_market, GALLERY)[:24]  # a few identities: quick to map
    feats = embed(model, [read_rgb(r.path) for r in records], flip=False)
    index = build_index(feats, records, model_id(model), tmp_path / "index", extra={"flip": False})
    gallery = Gallery.open(index, model)
    assert not gallery.flip and len(gallery) == len(records)
    assert [e.path for e in gallery.queries] == [r.path for r in read_split(synth_market, QUERY)]
    query = gallery.query(3)
    np.testing.assert_allclose(query.feature, embed(model, [query.image], flip=False)[0], atol=1e-6)
    assert gallery.scores() is not None

    other = build_index(feats[:3], records[:3], "0123456789abcdef", tmp_path / "other")
    with pytest.raises(IndexModelMismatch, match="rebuild the index"):
        Gallery.open(other, model)


def test_an_index_written_by_the_command_line_serves_the_exported_model(reid: tuple[torch.nn.Module, Path],
                                                                       model: OnnxModel, synth_market: Path,
                                                                       tmp_path: Path) -> None:
    """``twinview reid index`` (torch) records the weights' fingerprint that the export's card carries."""
    from downstream.reid.search import index_gallery

    folder = tmp_path / "market" / GALLERY
    folder.mkdir(parents=True)
    for src in sorted((synth_market / GALLERY).iterdir())[4:24]:  # junk first: these are people
        shutil.copy(src, folder / src.name)
    done = index_gallery(folder, reid[1].parent / "run", tmp_path / "index", progress=False)
    assert done["model_id"] == model_id(model)
    gallery = Gallery.open(tmp_path / "index", model)
    assert gallery.flip and gallery.ids_known and gallery.queries == []  # no query/ beside it
    first = sorted(folder.iterdir())[0]
    hit = gallery.search(gallery.upload(png(read_rgb(first)), "me.png"), k=1).hits[0]
    assert Path(hit.path).name == first.name and hit.score == pytest.approx(1.0, abs=1e-4)


def test_the_app_library_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\nimport apps.gallery\n"
            "print(sorted(m for m, v in sys.modules.items() if v and m.split('.')[0] in ('torch', 'monai')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]


def test_the_threshold_decides_what_is_a_match(model: OnnxModel, synth_market: Path, cache: Path) -> None:
    gallery = Gallery.open(synth_market, model, cache=cache)
    query = gallery.query(1)
    everything = gallery.search(query, k=5, threshold=-1.0)
    assert len(everything.matches) == 5 and everything.message is None
    third = everything.hits[2].score
    assert [h.rank for h in gallery.search(query, k=5, threshold=third).matches] == [1, 2, 3]
    above = min(everything.hits[0].score + 1e-3, 1.0 + 1e-3)
    none = gallery.search(query, k=5, threshold=above)
    assert none.matches == [] and len(none.hits) == 5
    assert none.message == f"no match above {above:.2f} (best similarity {everything.hits[0].score:.3f})"


def test_bad_uploads_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    image = np.random.default_rng(0).integers(0, 256, (64, 32, 3), dtype=np.uint8)
    good = png(image)
    assert decode_upload(good, "ok.png").shape == (64, 32, 3)
    gif = io.BytesIO()
    Image.fromarray(image).save(gif, format="GIF")
    cases = [(b"hello, not an image", "not an image"), (good[: len(good) // 2], "corrupt or truncated"),
             (b"", "empty file"), (gif.getvalue(), "a GIF image")]
    for data, reason in cases:
        with pytest.raises(DataError, match=reason) as err:
            decode_upload(data, "up.png")
        assert str(err.value).startswith("up.png: ") and "\n" not in str(err.value)
    monkeypatch.setenv("TWINVIEW_MAX_UPLOAD_MB", "0.001")
    with pytest.raises(DataError, match=r"over the upload cap of 0.001 MB \(TWINVIEW_MAX_UPLOAD_MB\)"):
        decode_upload(good, "up.png")
    monkeypatch.setenv("TWINVIEW_MAX_UPLOAD_MB", "lots")
    with pytest.raises(DataError, match="TWINVIEW_MAX_UPLOAD_MB must be a positive number"):
        decode_upload(good, "up.png")


def test_models_and_folders_that_cannot_serve_are_named(model: OnnxModel, tmp_path: Path) -> None:
    import onnx

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not onnx at all")
    bare = tmp_path / "bare.onnx"
    proto = onnx.load(str(model.path))
    del proto.metadata_props[:]
    onnx.save(proto, str(bare))
    for path, reason in [(tmp_path / "missing.onnx", "no such model file"), (garbage, "not a readable ONNX"),
                         (bare, "carries no twinview model card")]:
        with pytest.raises(DataError, match=reason):
            load_model(path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    for path, reason in [(tmp_path / "nowhere", "no such folder"), (tmp_path / "empty", "no images"),
                         (garbage, "neither a folder nor a .csv file")]:
        with pytest.raises(DataError, match=reason):
            Gallery.open(path, model, cache=tmp_path / "cache")


# --------------------------------------------------------------------------- the page


def app(monkeypatch: pytest.MonkeyPatch, model_path: Path | str, gallery: Path | str):  # noqa: ANN201
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("TWINVIEW_RETRIEVAL_MODEL", str(model_path))
    monkeypatch.setenv("TWINVIEW_GALLERY", str(gallery))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    return at


def errors(at) -> list[str]:  # noqa: ANN001
    return [e.value for e in at.error]


def test_the_page_shows_the_top_k_and_the_scores(monkeypatch: pytest.MonkeyPatch, reid: tuple, cache: Path,
                                                 synth_market: Path) -> None:
    at = app(monkeypatch, reid[1], synth_market)
    assert not at.exception and errors(at) == []
    assert {m.label for m in at.metric} == {"Rank-1", "mAP"}
    at.sidebar.slider[0].set_value(6)  # top k
    at.sidebar.slider[1].set_value(0.0)  # threshold: every hit is a match
    at.sidebar.selectbox[0].set_value(2)
    at.run()
    assert not at.exception and errors(at) == []
    captions = [c for image in at.image for c in image.captions]
    query = [c for c in captions if c.startswith("query: ")]
    hits = [c for c in captions if c.startswith("#")]
    picked = read_split(synth_market, QUERY)[2]
    assert query == [f"query: {picked.path.name} · id {picked.pid:04d} · cam {picked.camid}"]
    assert len(hits) == 6
    assert all(" · sim " in c and " · id " in c and " · cam " in c for c in hits)
    assert [c.split(" ")[0] for c in hits] == [f"#{r}" for r in range(1, 7)]

    at.sidebar.slider[1].set_value(1.0)  # nothing reaches a similarity of 1
    at.run()
    assert not at.exception and any(w.value.startswith("no match above 1.00") for w in at.warning)


def test_uploads_on_the_page(monkeypatch: pytest.MonkeyPatch, reid: tuple, cache: Path,
                             synth_market: Path) -> None:
    at = app(monkeypatch, reid[1], synth_market)
    crop = read_rgb(sorted((synth_market / GALLERY).iterdir())[5])
    at.sidebar.slider[1].set_value(0.0)
    at.sidebar.file_uploader[0].set_value(("me.png", png(crop), "image/png"))
    at.run()
    assert not at.exception and errors(at) == []
    captions = [c for image in at.image for c in image.captions]
    assert "query: me.png" in captions and captions[1].startswith("#1 · sim 1.000")

    good = png(crop)
    for name, data, reason in [("note.png", b"plain text", "not an image"),
                               ("cut.png", good[: len(good) // 2], "corrupt or truncated")]:
        at.sidebar.file_uploader[0].set_value((name, data, "image/png"))
        at.run()
        assert not at.exception and len(errors(at)) == 1 and errors(at)[0].startswith(f"{name}: ")
        assert reason in errors(at)[0]
    monkeypatch.setenv("TWINVIEW_MAX_UPLOAD_MB", "0.001")  # 1000 bytes
    at = app(monkeypatch, reid[1], synth_market)
    at.sidebar.file_uploader[0].set_value(("big.png", good, "image/png"))
    at.run()
    assert not at.exception and errors(at) == [f"big.png: {len(good) / 1e6:.3g} MB is over the upload cap of "
                                               "0.001 MB (TWINVIEW_MAX_UPLOAD_MB)"]


def test_the_page_names_what_is_missing_or_wrong(monkeypatch: pytest.MonkeyPatch, model: OnnxModel,
                                                 tmp_path: Path, synth_market: Path) -> None:
    import onnx

    at = app(monkeypatch, "", "")
    assert not at.exception and "make demo" in at.info[0].value and "twinview export" in at.info[0].value
    at = app(monkeypatch, model.path, "")
    assert not at.exception and "bounding_box_test" in at.info[0].value

    bare = tmp_path / "bare.onnx"
    proto = onnx.load(str(model.path))
    del proto.metadata_props[:]
    onnx.save(proto, str(bare))
    at = app(monkeypatch, bare, synth_market)
    assert not at.exception and errors(at) == [f"{bare}: carries no twinview model card: export it with "
                                               "`twinview export`"]
    at = app(monkeypatch, model.path, tmp_path / "nowhere")
    assert not at.exception and errors(at) == [f"{tmp_path / 'nowhere'}: no such folder or .csv file"]

    records = read_split(synth_market, GALLERY)[:6]
    index = build_index(np.eye(6, 512, dtype=np.float32), records, "0123456789abcdef", tmp_path / "index")
    at = app(monkeypatch, model.path, index)
    assert not at.exception and len(errors(at)) == 1 and "rebuild the index" in errors(at)[0]
