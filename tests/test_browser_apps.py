"""The apps in a real browser: each served by ``streamlit run`` on localhost (the command line of
``twinview app``) and driven in Debian's headless chromium with Selenium.

Each test runs one retrieval or one segmentation, asserts on what the page shows and saves a screenshot
(into ``$TWINVIEW_SCREENSHOTS`` when set, else the test's folder). By default the models are tiny ones
exported here; with ``TWINVIEW_DEMO_OUT=demo_out`` the tests use the demo's exports and data instead
(``make screenshots``). Without chromium and chromedriver the tests skip, except under
``TWINVIEW_REQUIRE_BROWSER=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.browser]

DEMO_OUT = os.environ.get("TWINVIEW_DEMO_OUT") and os.path.abspath(os.environ["TWINVIEW_DEMO_OUT"])
WAIT_S = 180  # the first page load imports onnxruntime and runs the model on 2 busy cores


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("TWINVIEW_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1900",
                "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def screenshot_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("TWINVIEW_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(app: str, env: dict[str, str], log: Path) -> Iterator[str]:
    """``app`` served as ``twinview app`` serves it; yields its URL once the health check answers."""
    from twinview_cli.launch import app_command

    port = free_port()
    with log.open("w") as out:
        server = subprocess.Popen(app_command(app, port, 64), env={**os.environ, **env}, stdout=out,
                                  stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                    if answer.read().strip() == b"ok":
                        break
            except OSError:
                pass
            assert server.poll() is None, f"streamlit stopped: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"streamlit did not answer: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def page_text(driver: object) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def wait_for(driver: object, check: Callable[[str], bool], what: str) -> str:
    """The page's text once ``check`` holds on it; fails naming ``what`` and showing the page's end."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        text = page_text(driver)
        if check(text):
            time.sleep(1.0)  # let images finish painting before the screenshot
            return page_text(driver)
        time.sleep(0.5)
    raise AssertionError(f"the page never showed {what}; it shows:\n{page_text(driver)[-1500:]}")


# --- segmentation -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def segmentation_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """An exported segmentation model, a NIfTI scan and its label file."""
    if DEMO_OUT:
        msd = Path(DEMO_OUT) / "data" / "msd"
        image = sorted((msd / "imagesTr").glob("*.nii.gz"))[0]
        return Path(DEMO_OUT) / "models" / "segmentation.onnx", image, msd / "labelsTr" / image.name
    import nibabel as nib
    import numpy as np
    from test_app_segmentation import NON_RAS, export_tiny_model

    folder = tmp_path_factory.mktemp("browser_seg")
    model = export_tiny_model(folder)
    rng = np.random.default_rng(0)
    scan = rng.normal(100, 30, size=(28, 32, 12)).astype(np.float32)
    label = np.zeros(scan.shape, np.uint8)
    label[8:20, 10:22, 3:9] = 1
    label[10:16, 12:18, 4:8] = 2
    nib.save(nib.Nifti1Image(scan, NON_RAS), folder / "case_001.nii.gz")
    nib.save(nib.Nifti1Image(label, NON_RAS), folder / "case_001_label.nii.gz")
    return model, folder / "case_001.nii.gz", folder / "case_001_label.nii.gz"


def test_segmentation_in_a_browser(browser: object, segmentation_case: tuple[Path, Path, Path],
                                   tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    model, image, label = segmentation_case
    with served("segmentation", {"TWINVIEW_SEGMENTATION_MODEL": str(model)}, tmp_path / "seg.log") as url:
        browser.get(url)
        wait_for(browser, lambda t: "Image: NIfTI" in t, "the upload field")
        uploads = browser.find_elements(By.CSS_SELECTOR, "input[type=file]")
        assert len(uploads) == 2
        uploads[0].send_keys(str(image))
        wait_for(browser, lambda t: "Structures" in t and "Download the mask" in t, "the segmentation")
        browser.find_elements(By.CSS_SELECTOR, "input[type=file]")[1].send_keys(str(label))
        text = wait_for(browser, lambda t: "Dice against" in t, "the Dice table")
        images = browser.find_elements(By.CSS_SELECTOR, "[data-testid=stImage] img")
        browser.save_screenshot(str(screenshot_dir(tmp_path) / "segmentation_app.png"))
    assert len(images) == 3 and all(img.get_property("naturalWidth") > 0 for img in images)
    for view in ("axial", "coronal", "sagittal"):
        assert f"{view} slice" in text
    assert "Legend" in text and "volume (mL)" in text and "Download the mask (.nii.gz)" in text
    assert "Traceback" not in text and "Error" not in text.split("Dice against")[0]


# --- retrieval ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def retrieval_case(tmp_path_factory: pytest.TempPathFactory, synth_market: Path) -> tuple[Path, Path]:
    """An exported re-ID model and a Market-1501 folder to search."""
    if DEMO_OUT:
        return Path(DEMO_OUT) / "models" / "reid.onnx", Path(DEMO_OUT) / "data" / "market"
    from test_app_retrieval import export_tiny_model

    return export_tiny_model(tmp_path_factory.mktemp("browser_reid"))[1], synth_market


def test_retrieval_in_a_browser(browser: object, retrieval_case: tuple[Path, Path], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    model, market = retrieval_case
    env = {"TWINVIEW_RETRIEVAL_MODEL": str(model), "TWINVIEW_GALLERY": str(market),
           "TMPDIR": str(tmp_path)}  # the folder's index is cached under the temporary folder
    with served("retrieval", env, tmp_path / "reid.log") as url:
        browser.get(url)
        text = wait_for(browser, lambda t: "Rank-1" in t and "Embedding map" in t and " matches" in t,
                        "the scores, the matches and the map")
        hits = [c for c in browser.find_elements(By.CSS_SELECTOR, "[data-testid=stImageCaption]")
                if c.text.startswith("#")]
        browser.save_screenshot(str(screenshot_dir(tmp_path) / "retrieval_app.png"))
        assert "mAP" in text and "query: " in text and "Traceback" not in text
        assert len(hits) == 10 and [h.text.split(" ")[0] for h in hits] == [f"#{i}" for i in range(1, 11)]
        assert all(" · id " in h.text and " · cam " in h.text for h in hits)
        crop = sorted((market / "query").glob("*.jpg"))[-1]
        browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(crop))
        wait_for(browser, lambda t: f"query: {crop.name}" in t and " matches" in t, "the uploaded query")
