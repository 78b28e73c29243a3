"""``twinview app retrieval|segmentation``: start a browser app with Streamlit in a child process.

The apps are run as scripts (never imported here) so that the command line stays torch-free to start
and the app process holds only numpy, onnxruntime and Streamlit. What to show is passed through
environment variables that the apps read as the defaults of their sidebar fields.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from twinview.errors import DataError, TwinviewError, display_path

APPS_DIR = Path(__file__).resolve().parents[1] / "apps"
DEMO_MODELS = {"retrieval": Path("models/reid.onnx"), "segmentation": Path("models/segmentation.onnx")}
DEMO_GALLERY = Path("data/market")
MAKE_ONE = "run `make demo` (it exports the demo's models) or `twinview export RUN --out model.onnx`"


def demo_defaults(app: str, demo_out: Path) -> tuple[Path | None, Path | None]:
    """The demo's exported model (and gallery, for retrieval) under ``demo_out`` when present."""
    model = demo_out / DEMO_MODELS[app]
    gallery = demo_out / DEMO_GALLERY if app == "retrieval" else None
    return (model if model.is_file() else None,
            gallery if gallery is not None and gallery.is_dir() else None)


def app_command(app: str, port: int, max_upload_mb: int) -> list[str]:
    """The ``streamlit run`` command line of ``app`` (headless: the user opens the printed URL)."""
    return [sys.executable, "-m", "streamlit", "run", str(APPS_DIR / f"{app}_app.py"),
            "--server.headless", "true", "--server.port", str(port),
            "--server.maxUploadSize", str(max_upload_mb), "--browser.gatherUsageStats", "false"]


def launch(app: str, model: Path | None, gallery: Path | None = None, demo_out: Path = Path("demo_out"),
           port: int = 8501, max_upload_mb: int | None = None) -> int:
    """Start ``app`` on ``port`` with ``model`` (default: the demo's export) and wait for it to stop."""
    if importlib.util.find_spec("streamlit") is None or importlib.util.find_spec("onnxruntime") is None:
        raise TwinviewError("the apps need Streamlit and onnxruntime: pip install -e '.[apps]'")
    demo_model, demo_gallery = demo_defaults(app, demo_out)
    model = model or demo_model
    if model is None:
        raise DataError(demo_out / DEMO_MODELS[app], f"no model given and no demo export here; {MAKE_ONE}, "
                                                     "then pass --model FILE.onnx")
    if not Path(model).is_file():
        raise DataError(model, "no such ONNX file; " + MAKE_ONE)
    env = dict(os.environ)
    cap = max_upload_mb or (20 if app == "retrieval" else 512)
    env["TWINVIEW_MAX_UPLOAD_MB"] = str(cap)
    if app == "retrieval":
        env["TWINVIEW_RETRIEVAL_MODEL"] = str(Path(model).resolve())
        gallery = gallery or demo_gallery
        if gallery is not None:
            env["TWINVIEW_GALLERY"] = str(Path(gallery).resolve())
    else:
        env["TWINVIEW_SEGMENTATION_MODEL"] = str(Path(model).resolve())
    print(f"twinview: {app} app with {display_path(model)} on http://localhost:{port} (Ctrl-C stops it)",
          flush=True)
    try:
        return subprocess.call(app_command(app, port, cap), env=env)
    except KeyboardInterrupt:
        return 0
