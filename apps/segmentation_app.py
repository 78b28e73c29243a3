"""The segmentation app: upload a volume or image, see the exported model's mask over it, download the mask.

Run ``twinview app segmentation --model model.onnx`` (or ``streamlit run apps/segmentation_app.py`` with
``TWINVIEW_SEGMENTATION_MODEL`` set). CPU only, onnxruntime and numpy: no torch. Every mistake a user can
make (no model, a foreign model, a bad upload) is a one-line error on the page, never a traceback.

An exported detection model works here too: a PNG or TIFF upload is shown with the boxes scoring at least
the sidebar's score threshold drawn in, and the count of those objects per category.
"""

from __future__ import annotations

import hashlib
import html
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from apps import volumes
from apps.runtime import OnnxModel
from apps.uploads import MB
from twinview.errors import DataError

MODEL_ENV = "TWINVIEW_SEGMENTATION_MODEL"
NO_MODEL = ("No model given. Export a segmentation run to ONNX first (`make demo` writes one, or "
            "`twinview export RUN --out model.onnx`) and start the app with "
            "`twinview app segmentation --model model.onnx`, or type the file's path in the sidebar.")


@st.cache_resource(show_spinner="Loading the model...")
def load_model(path: str, stamp: tuple[int, int]) -> OnnxModel:
    """The model at ``path``; ``stamp`` (modification time, size) reloads it when the file changes."""
    return OnnxModel(path)


def open_model(path: str) -> OnnxModel:
    """The segmentation or detection model at ``path``; a DataError when it is missing, foreign or neither."""
    file = Path(path).expanduser()
    try:
        info = file.stat()
    except OSError:
        raise DataError(file, "no such ONNX file") from None
    model = load_model(str(file.resolve()), (info.st_mtime_ns, info.st_size))
    if model.task not in ("segmentation", "detection"):
        raise DataError(file, f"a {model.task} model; this app needs a segmentation or detection model "
                              "(`twinview export` a segmentation or detection run)")
    return model


def segmented(model: OnnxModel, name: str, data: bytes) -> dict[str, Any]:
    """The upload read and segmented, kept in the session per upload and model so that moving a slider
    does not run the model again."""
    key = (str(model.path), hashlib.sha256(data).hexdigest(), name)
    held = st.session_state.get("segmentation")
    if held is None or held["key"] != key:
        st.session_state.pop("segmentation", None)
        volume = volumes.read_upload(name, data, model.card)
        with st.spinner("Segmenting..."):
            mask = volumes.segment_volume(model, volume)
        held = {"key": key, "volume": volume, "mask": mask,
                "windows": volumes.window_presets(volume, model.card),
                "nifti": volumes.mask_nifti_bytes(mask, volume),
                "png": volumes.mask_png_bytes(mask) if volume.is_2d else None}
        st.session_state["segmentation"] = held
    return held


def detected(model: OnnxModel, name: str, data: bytes) -> dict[str, Any]:
    """The upload read and its detections (all scores), kept in the session per upload and model so that
    moving the score slider does not run the model again."""
    key = (str(model.path), hashlib.sha256(data).hexdigest(), name)
    held = st.session_state.get("detection")
    if held is None or held["key"] != key:
        st.session_state.pop("detection", None)
        image = volumes.read_detection_upload(name, data)
        with st.spinner("Detecting..."):
            found = volumes.detect_image(model, image)
        held = {"key": key, "name": name, "image": image, "found": found}
        st.session_state["detection"] = held
    return held


def show_detections(model: OnnxModel, result: dict[str, Any]) -> None:
    card, found = model.card, result["found"]
    min_score = st.sidebar.slider("Score threshold", 0.0, 1.0, 0.5, 0.05)
    counts = volumes.detection_counts(found, min_score, card)
    total = sum(counts.values())
    each = f" ({', '.join(f'{n} {html.escape(k)}' for k, n in counts.items())})" if len(counts) > 1 else ""
    st.markdown(f"**{total}** object{'s' if total != 1 else ''} detected with score ≥ {min_score:.2f}{each}")
    names = volumes.category_names(card)
    st.markdown(legend({k: names[c] for k, c in enumerate(names, start=1)}), unsafe_allow_html=True)
    st.image(volumes.draw_detections(result["image"], found, min_score, card),
             caption=f"{total} of {len(found['scores'])} detections", width="stretch")
    stem = volumes.upload_stem(result["name"])
    st.download_button("Download the detections (.json)", volumes.detections_json(found, min_score, card),
                       file_name=f"{stem}_detections.json", mime="application/json")


def legend(labels: dict[int, str]) -> str:
    swatches = []
    for c, name in labels.items():
        if c:
            r, g, b = volumes.label_colour(c)
            swatches.append(f'<span style="display:inline-block;width:0.9em;height:0.9em;'
                            f'background:rgb({r},{g},{b});margin-right:0.3em"></span>{html.escape(name)}')
    return "Legend: " + " &nbsp; ".join(swatches)


def default_slice(mask: np.ndarray, axis: int) -> int:
    """The slice with the most foreground along ``axis`` (the middle one when there is none)."""
    counts = (mask > 0).sum(axis=tuple(a for a in range(mask.ndim) if a != axis))
    return int(np.argmax(counts)) if counts.any() else mask.shape[axis] // 2


def show(model: OnnxModel, result: dict[str, Any], label_file: Any) -> None:
    volume, mask = result["volume"], result["mask"]
    labels = volumes.label_names(model.card)
    if volume.note:
        st.info(volume.note)
    side = st.sidebar
    window = result["windows"][side.selectbox("Window", list(result["windows"]))]
    opacity = side.slider("Overlay opacity", 0.0, 1.0, 0.45, 0.05)
    channel = 0
    if not volume.is_2d and volume.image.shape[0] > 1:
        channel = side.selectbox("Channel", range(volume.image.shape[0]))
    st.markdown(legend(labels), unsafe_allow_html=True)
    views = volumes.view_axes(volume)
    for column, (view, axis) in zip(st.columns(len(views)), views.items(), strict=True):
        with column:
            index = 0
            if axis >= 0 and mask.shape[axis] > 1:
                index = st.slider(f"{view} slice", 0, mask.shape[axis] - 1, default_slice(mask, axis),
                                  key=f"slice_{view}_{result['key'][1][:12]}")  # new upload, new slider
            caption = view if axis < 0 else f"{view} {index + 1}/{mask.shape[axis]}"
            st.image(volumes.overlay(volume, mask, axis, index, window, opacity, channel), caption=caption,
                     width="stretch")
    st.subheader("Structures")
    st.table(volumes.structure_volumes(mask, volume.spacing, labels), hide_index=True)
    if label_file is not None:
        st.subheader(f"Dice against {label_file.name}")
        try:
            truth = volumes.read_label(label_file.name, label_file.getvalue(), volume, labels)
        except DataError as err:
            st.error(str(err))
        else:
            dice = volumes.dice_per_structure(mask, truth, labels)
            st.table([{"structure": k, "Dice": round(v, 4)} for k, v in dice.items()], hide_index=True)
    stem = volumes.upload_stem(volume.name)
    st.download_button("Download the mask (.nii.gz)", result["nifti"], file_name=f"{stem}_mask.nii.gz",
                       mime="application/gzip")
    if result["png"] is not None:
        st.download_button("Download the mask (.png)", result["png"], file_name=f"{stem}_mask.png",
                           mime="image/png")


@contextmanager
def shown_as_error(name: str, action: str) -> Iterator[None]:
    """A bad or oversized upload becomes one line on the page, not a traceback."""
    try:
        yield
    except DataError as err:
        st.error(str(err))
    except MemoryError:
        st.error(f"{name}: too large to {action} this machine's memory")


def main() -> None:
    st.set_page_config(page_title="twinview segmentation", layout="wide")
    st.title("Segmentation")
    path = st.sidebar.text_input("Model (.onnx)", os.environ.get(MODEL_ENV, "")).strip()
    if not path:
        st.info(NO_MODEL)
        return
    try:
        model = open_model(path)
        cap = volumes.max_upload_bytes() / MB
    except DataError as err:
        st.error(str(err))
        return
    card = model.card
    data = card["data"]
    st.sidebar.caption(f"{data['name']} ({data['modality']}), {card['spatial_dims']}D, "
                       f"{card['in_channels']} channel(s)")
    if model.task == "detection":
        upload = st.file_uploader("Image: PNG or TIFF (the model detects in 2D images)",
                                  type=list(volumes.UPLOAD_TYPES), max_upload_size=math.ceil(cap))
        if upload is None:
            st.caption(f"Uploads up to {cap:g} MB. Nothing is written to disk.")
            return
        with shown_as_error(upload.name, "detect in"):
            show_detections(model, detected(model, upload.name, upload.getvalue()))
        return
    upload = st.file_uploader("Image: NIfTI, zipped DICOM series, PNG or TIFF",
                              type=list(volumes.UPLOAD_TYPES), max_upload_size=math.ceil(cap))
    label_file = st.file_uploader("Optional label file of the same image, for Dice",
                                  type=list(volumes.LABEL_TYPES), max_upload_size=math.ceil(cap))
    if upload is None:
        st.caption(f"Uploads up to {cap:g} MB. Nothing is written to disk; DICOM patient tags are not read.")
        return
    with shown_as_error(upload.name, "segment in"):
        show(model, segmented(model, upload.name, upload.getvalue()), label_file)


main()
