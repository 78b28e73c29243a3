"""The person retrieval app (Streamlit, CPU, onnxruntime; no torch).

Start it with ``twinview app retrieval --model reid.onnx --gallery DIR``, which sets the two environment
variables below and runs ``streamlit run`` on this file. A query (picked from the gallery's query set or
uploaded) is embedded with the exported model, the gallery's top-k are shown with true matches framed
green, rank-1 / mAP of the query set when identities are known, and the query on the embedding map.
User mistakes (paths, files, uploads) are one-line errors on the page, never a traceback.
"""

from __future__ import annotations

import os

import streamlit as st

from apps import gallery as lib
from apps.gallery import Gallery, Query, SearchResult
from apps.runtime import OnnxModel
from apps.uploads import MAX_UPLOAD_ENV, MB
from twinview.errors import DataError

MODEL_ENV, GALLERY_ENV = "TWINVIEW_RETRIEVAL_MODEL", "TWINVIEW_GALLERY"
HOW_TO_MODEL = ("No model given. Enter the path of an exported re-ID model (.onnx): `make demo` trains and "
                "exports one, `twinview export RUN --out model.onnx` exports a run of yours.")
HOW_TO_GALLERY = ("No gallery given. Enter a folder of person crops, a CSV `path,person_id[,camera]`, a "
                  "Market-1501 root (with `query/` and `bounding_box_test/`), or an index folder written by "
                  "`twinview reid index`; `make demo` writes a synthetic Market-1501 folder.")
COLUMNS = 5
MAX_K = 50
DEFAULT_K = 10
DEFAULT_THRESHOLD = 0.5


def _stamp(path: str) -> tuple[int, int]:
    """Modification time and size: a changed file or folder is loaded again rather than served stale."""
    try:
        stat = os.stat(path)
    except OSError:
        return (0, 0)
    return (stat.st_mtime_ns, stat.st_size)


@st.cache_resource(show_spinner="Loading the model...", max_entries=4)
def cached_model(path: str, stamp: tuple[int, int]) -> OnnxModel:
    return lib.load_model(path)


@st.cache_resource(show_spinner="Opening the gallery (a folder of images is embedded once)...", max_entries=4)
def cached_gallery(path: str, model_path: str, stamps: tuple[tuple[int, int], ...]) -> Gallery:
    return Gallery.open(path, cached_model(model_path, stamps[0]))


def caption(head: str, pid: int | None, camid: int | None) -> str:
    """``head``, then the identity and camera when the file name or the CSV gave them."""
    ids = f" · id {pid:04d}" if pid is not None else ""
    cam = f" · cam {camid}" if camid is not None else ""
    return f"{head}{ids}{cam}"


def show_query(query: Query) -> None:
    text = caption(f"query: {query.name}", query.pid, query.camid)
    st.image(lib.framed(query.image, (0, 0, 0)), caption=text, width=140)


def show_hits(result: SearchResult) -> None:
    """The matches in rows of :data:`COLUMNS`; true matches framed green, other ids red."""
    if result.message:
        st.warning(result.message)
        return
    matches = result.matches
    below = len(result.hits) - len(matches)
    st.subheader(f"Top {len(matches)} matches" + (f" ({below} more below the threshold)" if below else ""))
    for start in range(0, len(matches), COLUMNS):
        for col, hit in zip(st.columns(COLUMNS), matches[start:start + COLUMNS], strict=False):
            verdict = result.verdict(hit)
            head = f"#{hit.rank} · sim {hit.score:.3f}"
            text = caption(head, hit.pid, hit.camid) + (f" · {verdict}" if verdict else "")
            with col:
                try:
                    image = lib.read_rgb(hit.path)
                except DataError as err:
                    st.error(str(err))
                    continue
                st.image(lib.framed(image, lib.FRAME_COLOURS.get(verdict)), caption=text, width="stretch")


def show_scores(gallery: Gallery) -> None:
    """Rank-1 and mAP of the query set; a gallery where they cannot be computed still serves queries."""
    try:
        with st.spinner(f"Scoring the {len(gallery.queries)} queries..."):
            scores = gallery.scores()
    except DataError as err:
        st.info(str(err))
        return
    if scores is None:
        return
    rank1, mAP = st.columns(2)
    rank1.metric("Rank-1", f"{100 * float(scores.cmc[0]):.1f}%")
    mAP.metric("mAP", f"{100 * scores.mAP:.1f}%")
    skipped = f"; {scores.num_skipped} without a true match skipped" if scores.num_skipped else ""
    st.caption(f"{scores.num_valid} queries under the Market-1501 protocol (same identity and camera "
               f"ignored){skipped}.")


def pick_query(gallery: Gallery) -> Query | None:
    """The uploaded image if there is one, else the query picked from the query set."""
    cap = f"At most {lib.max_upload_bytes() / MB:.3g} MB ({MAX_UPLOAD_ENV})"
    upload = st.sidebar.file_uploader("Upload a person crop (PNG or JPEG)", type=["png", "jpg", "jpeg"],
                                      help=f"{cap}; it replaces the picked query.")
    if upload is not None:
        return gallery.upload(upload.getvalue(), upload.name)
    if not gallery.queries:
        st.info("This gallery has no query set: upload a person crop to search it.")
        return None
    i = st.sidebar.selectbox("Query from the query set", range(len(gallery.queries)),
                             format_func=lambda j: gallery.queries[j].path.name)
    return gallery.query(i)


def main() -> None:
    st.set_page_config(page_title="twinview: person retrieval", layout="wide")
    st.title("Person retrieval")
    model_path = st.sidebar.text_input("Model (.onnx)", os.environ.get(MODEL_ENV, "")).strip()
    gallery_path = st.sidebar.text_input("Gallery (image folder, CSV or index folder)",
                                         os.environ.get(GALLERY_ENV, "")).strip()
    if not model_path:
        st.info(HOW_TO_MODEL)
        return
    try:
        cached_model(model_path, _stamp(model_path))
        if not gallery_path:
            st.info(HOW_TO_GALLERY)
            return
        show_page(cached_gallery(gallery_path, model_path, (_stamp(model_path), _stamp(gallery_path))))
    except DataError as err:
        st.error(str(err))


def show_page(gallery: Gallery) -> None:
    """Sidebar controls, the query and its matches, the scores and the map."""
    st.caption(gallery.describe())
    k = st.sidebar.slider("Top k", 1, max(2, min(MAX_K, len(gallery))), min(DEFAULT_K, len(gallery)))
    threshold = st.sidebar.slider("No-match threshold (cosine similarity)", 0.0, 1.0, DEFAULT_THRESHOLD, 0.05,
                                  help="Hits less similar than this are not shown as matches.")
    query = pick_query(gallery)
    if gallery.cameras_known and gallery.queries:
        show_scores(gallery)
    if query is None:
        return
    result = gallery.search(query, k, threshold)
    left, right = st.columns([1, 4])
    with left:
        show_query(query)
    with right:
        show_hits(result)
    if any(result.verdict(h) == lib.TRUE_MATCH for h in result.matches):
        st.caption("Green frame: true match (same identity, other camera); red: another identity; "
                   "grey: the same identity from the same camera (ignored by the protocol).")
    figure = gallery.map_figure(result)
    if figure is not None:
        st.subheader("Embedding map")
        st.pyplot(figure, width="content")

main()
