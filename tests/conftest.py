"""Shared fixtures: the real data folder (skips when absent), small synthetic data sets, and a run killed
right after a checkpoint."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    """``../shared/data`` beside the repository, or ``$TWINVIEW_SHARED_DATA``."""
    return Path(os.environ.get("TWINVIEW_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real evaluation data (read-only); the test is skipped when the folder is absent."""
    root = shared_data_root()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}")
    return root


def _synth(kind: str, factory: pytest.TempPathFactory) -> Path:
    """A small synthetic data set (seed 0), shared by the session: tests copy it before changing it."""
    from twinview.data.synth import generate

    out = factory.mktemp("synth") / kind
    generate(kind, out, seed=0, size="small")
    return out


@pytest.fixture(scope="session")
def synth_market(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synth("market", tmp_path_factory)


@pytest.fixture(scope="session")
def synth_msd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synth("msd", tmp_path_factory)


@pytest.fixture(scope="session")
def synth_nuclei(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synth("nuclei", tmp_path_factory)


@pytest.fixture
def killed_after_checkpoint(monkeypatch: pytest.MonkeyPatch
                            ) -> Callable[[int], contextlib.AbstractContextManager]:
    """``with killed_after_checkpoint(step): run(...)``: the training loop raises KeyboardInterrupt right
    after writing the checkpoint of ``step`` (as a kill would leave the run), which the block expects;
    checkpoints are saved normally again after it."""
    import engine.loop as loop

    real_save = loop.save_rotating

    @contextlib.contextmanager
    def killed(step: int) -> Iterator[None]:
        def save_then_die(state: dict, run_dir: Path, at: int, keep_last: int) -> Path:
            path = real_save(state, run_dir, at, keep_last)
            if at == step:
                raise KeyboardInterrupt
            return path

        monkeypatch.setattr(loop, "save_rotating", save_then_die)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(loop, "save_rotating", real_save)

    return killed
