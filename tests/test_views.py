"""Domain views: shapes, dtypes, value ranges, determinism, seeding, metadata and the view grid."""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.view_grid import CELL_PX, save_view_grid
from pretrain.views import PRESETS, TwoViews, build_views, eval_transform, preset_metadata


@contextmanager
def no_warnings() -> Iterator[None]:
    """Any warning is an error: albumentations 2.x only warns about 1.x argument names, then ignores them."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def ct_slice(shape: tuple[int, int] = (512, 512)) -> np.ndarray:
    """An int16 HU phantom: air, a soft-tissue body with an organ and a lesion, a bone, CT-like noise."""
    yy, xx = np.mgrid[: shape[0], : shape[1]] / np.array(shape).reshape(2, 1, 1)
    hu = np.full(shape, -1000.0)
    hu[((yy - 0.5) / 0.4) ** 2 + ((xx - 0.5) / 0.45) ** 2 < 1] = 40.0
    hu[((yy - 0.5) / 0.12) ** 2 + ((xx - 0.6) / 0.08) ** 2 < 1] = 120.0
    hu[((yy - 0.3) / 0.04) ** 2 + ((xx - 0.5) / 0.04) ** 2 < 1] = 900.0
    hu += np.random.default_rng(0).normal(0.0, 15.0, shape)
    return np.clip(hu, -1024, 3071).astype(np.int16)


def mri_volume(shape: tuple[int, int, int] = (35, 50, 35)) -> np.ndarray:
    """A float MRI-like volume in arbitrary units: smooth positive head, zero background."""
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij"))
    head = (grid**2).sum(0) < 0.8
    rng = np.random.default_rng(1)
    return (head * (800.0 + 300.0 * grid[0] + rng.normal(0.0, 40.0, shape))).astype(np.float32)


def rgba_uint8(shape: tuple[int, int] = (256, 320)) -> np.ndarray:
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 60, (*shape, 3))
    rgb[64:128, 100:180] += 150  # bright "nuclei"
    alpha = np.full((*shape, 1), 255)
    return np.concatenate([rgb, alpha], axis=-1).astype(np.uint8)


def grey_uint16(shape: tuple[int, int] = (256, 320)) -> np.ndarray:
    rng = np.random.default_rng(3)
    return (rng.gamma(2.0, 300.0, shape) + 200).astype(np.uint16)


def rgb_uint8(shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(4).integers(0, 256, (*shape, 3)).astype(np.uint8)


_NORM = preset_metadata("natural", (8, 8))["intensity"]
IMAGENET_RANGE = (min(-m / s for m, s in zip(_NORM["mean"], _NORM["std"], strict=True)),
                  max((1 - m) / s for m, s in zip(_NORM["mean"], _NORM["std"], strict=True)))

# preset, spatial_dims, input factory, output size, expected channels, value range (None: z-scores)
CASES: list[tuple[str, int, Callable[[], np.ndarray], tuple[int, ...], int, tuple[float, float] | None]] = [
    ("ct", 2, ct_slice, (224, 224), 1, (0.0, 1.0)),
    ("ct", 3, lambda: np.stack([ct_slice((96, 96))] * 40), (32, 64, 64), 1, (0.0, 1.0)),
    ("mri", 2, lambda: mri_volume()[17], (64, 64), 1, None),
    ("mri", 3, mri_volume, (32, 32, 32), 1, None),
    ("microscopy", 2, rgba_uint8, (128, 128), 3, (0.0, 1.0)),
    ("microscopy", 2, grey_uint16, (128, 160), 3, (0.0, 1.0)),
    ("reid", 2, lambda: rgb_uint8((128, 64)), (256, 128), 3, IMAGENET_RANGE),
    ("natural", 2, lambda: rgb_uint8((240, 320)), (96, 96), 3, IMAGENET_RANGE),
]


@pytest.mark.parametrize(
    ("preset", "dims", "make", "size", "channels", "value_range"),
    CASES,
    ids=[f"{c[0]}-{c[1]}d-{c[3]}" for c in CASES],
)
def test_views_shape_dtype_range_and_differ(preset, dims, make, size, channels, value_range) -> None:
    sample = make()
    with no_warnings():
        views = build_views(preset, size, spatial_dims=dims)
        v1, v2 = views(sample)
        ev = eval_transform(preset, size, spatial_dims=dims)(sample)
    for t in (v1, v2, ev):
        assert type(t) is torch.Tensor and t.dtype == torch.float32
        assert t.shape == (channels, *size)
        assert torch.isfinite(t).all()
        if value_range is None:  # z-scores: unbounded but of unit scale
            assert 0.3 < float(t[t != 0].std()) < 3.0
        else:
            assert value_range[0] - 1e-5 <= float(t.min()) and float(t.max()) <= value_range[1] + 1e-5
    assert not torch.equal(v1, v2)


def test_ct_has_no_colour_and_replicated_channels_are_equal() -> None:
    with no_warnings():
        views = build_views("ct", (96, 96), channels=3)
        for _ in range(5):
            for view in views(ct_slice()):
                assert torch.equal(view[0], view[1]) and torch.equal(view[1], view[2])


def test_ct_eval_is_the_documented_hu_window() -> None:
    hu = ct_slice((64, 64))
    meta = preset_metadata("ct", (64, 64), window=(-600.0, 1500.0))
    assert meta["intensity"] == {"kind": "ct_window", "window": [-1350.0, 150.0]}
    low, high = meta["intensity"]["window"]
    expected = np.clip((hu.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    out = eval_transform("ct", (64, 64), window=(-600.0, 1500.0))(hu)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)


def test_mri_eval_is_zscore_on_nonzero_voxels_with_padding() -> None:
    volume = mri_volume((20, 40, 30))  # smaller than the patch along two axes: zero-padded
    with no_warnings():
        out = eval_transform("mri", (32, 32, 32), spatial_dims=3)(volume)
        views = build_views("mri", (32, 32, 32), spatial_dims=3)(volume)
    assert out.shape == (1, 32, 32, 32) and all(v.shape == (1, 32, 32, 32) for v in views)
    foreground = out[out != 0]
    assert abs(float(foreground.mean())) < 1e-3 and abs(float(foreground.std()) - 1.0) < 1e-2


@pytest.mark.parametrize(("size", "aspect"), [((256, 128), 2.0), ((128, 64), 2.0), ((384, 128), 3.0)])
def test_reid_output_keeps_the_person_aspect_ratio(size: tuple[int, int], aspect: float) -> None:
    with no_warnings():
        v1, v2 = build_views("reid", size)(rgb_uint8((128, 64)))
    assert v1.shape[1] / v1.shape[2] == aspect and v1.shape == v2.shape


def test_microscopy_drops_alpha_and_can_output_grey() -> None:
    opaque = rgba_uint8()
    translucent = opaque.copy()
    translucent[..., 3] = np.random.default_rng(5).integers(0, 256, translucent.shape[:2])
    with no_warnings():
        transform = eval_transform("microscopy", (64, 64))
        assert torch.equal(transform(opaque), transform(translucent))
        grey = build_views("microscopy", (64, 64), channels=1)(opaque)
    assert all(v.shape == (1, 64, 64) for v in grey)


@pytest.mark.parametrize(("preset", "dims", "make", "size"), [(c[0], c[1], c[2], c[3]) for c in CASES])
def test_eval_transform_is_deterministic(preset, dims, make, size) -> None:
    sample = make()
    transform = eval_transform(preset, size, spatial_dims=dims)
    torch.manual_seed(0)
    first = transform(sample)
    torch.manual_seed(1)
    assert torch.equal(first, transform(sample))


@pytest.mark.parametrize(("preset", "dims", "make", "size"), [(c[0], c[1], c[2], c[3]) for c in CASES])
def test_views_are_reproducible_under_torch_seed(preset, dims, make, size) -> None:
    sample = make()
    a, b = build_views(preset, size, spatial_dims=dims), build_views(preset, size, spatial_dims=dims)
    torch.manual_seed(7)
    first = a(sample)
    torch.manual_seed(7)
    again = a(sample)
    torch.manual_seed(7)
    other_instance = b(sample)
    torch.manual_seed(8)
    other_seed = a(sample)
    for x, y, z in zip(first, again, other_instance, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert not torch.equal(first[0], other_seed[0])


def test_set_seed_and_pickling_reproduce_views() -> None:
    views = build_views("ct", (64, 64))
    sample = ct_slice((128, 128))
    views.set_seed(3)
    first = [views(sample) for _ in range(3)]
    clone = pickle.loads(pickle.dumps(views))  # DataLoader workers under spawn/forkserver
    views.set_seed(3)
    clone.set_seed(3)
    for pair in first:
        again, cloned = views(sample), clone(sample)
        assert all(
            torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(pair, again, cloned, strict=True)
        )
    assert not torch.equal(first[0][0], first[1][0])  # the stream moves on between calls


class _RepeatedSample(torch.utils.data.Dataset):
    """The same sample at every index: any difference between items comes from the views."""

    def __init__(self, views: TwoViews, sample: np.ndarray, n: int) -> None:
        self.views, self.sample, self.n = views, sample, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.views(self.sample)


def test_dataloader_workers_draw_different_but_reproducible_views() -> None:
    dataset = _RepeatedSample(build_views("reid", (64, 32)), rgb_uint8((128, 64)), n=4)

    def run() -> list[torch.Tensor]:
        torch.manual_seed(11)  # the trainer's seeding; torch gives each worker base_seed + worker_id
        return [v1 for v1, _ in torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)]

    first = run()
    assert all(torch.equal(x, y) for x, y in zip(first, run(), strict=True))
    assert not torch.equal(first[0], first[1])  # items 0 and 1 come from different workers


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_metadata_is_json_in_the_card_vocabulary(preset: str) -> None:
    meta = preset_metadata(preset, (64, 32))
    assert json.loads(json.dumps(meta)) == meta
    kind = meta["intensity"]["kind"]
    expected = {"ct": "ct_window", "mri": "zscore_nonzero", "microscopy": "percentile"}
    assert kind == expected.get(preset, "mean_std")
    if kind == "mean_std":
        assert len(meta["intensity"]["mean"]) == len(meta["intensity"]["std"]) == 3


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        build_views("xray", (64, 64))
    with pytest.raises(ValueError, match="unknown parameters"):
        build_views("ct", (64, 64), var_limit=(10, 50))
    with pytest.raises(ValueError, match="channels must be 3"):
        build_views("reid", (64, 32), channels=1)
    with pytest.raises(ValueError, match="2D only"):
        build_views("reid", (32, 32, 32), spatial_dims=3)
    with pytest.raises(ValueError, match="uint8"):
        build_views("natural", (64, 64))(np.zeros((64, 64, 3), np.float32))


@pytest.mark.parametrize(
    ("preset", "dims", "samples", "size"),
    [
        ("ct", 2, [ct_slice((128, 128)), ct_slice((96, 128))], (64, 64)),
        ("reid", 2, [rgb_uint8((128, 64))], (128, 64)),
        ("mri", 3, [mri_volume((30, 40, 30))], (24, 32, 32)),
    ],
)
def test_save_view_grid_writes_png_of_expected_size(preset, dims, samples, size, tmp_path: Path) -> None:
    with no_warnings():
        out = save_view_grid(preset, samples, tmp_path / "grid.png", n_pairs=2, spatial_dims=dims, size=size)
    cell_w = round(CELL_PX * size[-1] / size[-2])
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (5 * cell_w, len(samples) * CELL_PX)


@pytest.mark.realdata
def test_real_hippocampus_mri_3d_and_market_reid(shared_data: Path) -> None:
    nib = pytest.importorskip("nibabel")
    nifti = sorted((shared_data / "Task04_Hippocampus" / "imagesTr").glob("*.nii.gz"))[0]
    jpeg = sorted((shared_data / "Market-1501-mini" / "bounding_box_train").glob("*.jpg"))[0]
    volume = np.asanyarray(nib.load(nifti).dataobj)
    crop = np.asarray(Image.open(jpeg))
    with no_warnings():
        mri = build_views("mri", (32, 32, 32), spatial_dims=3)(volume)
        reid = build_views("reid", (256, 128))(crop)
    for view in mri:
        assert view.shape == (1, 32, 32, 32) and torch.isfinite(view).all()
        assert 0.3 < float(view[view != 0].std()) < 3.0
    low, high = IMAGENET_RANGE
    for view in reid:
        assert view.shape == (3, 256, 128)
        assert low - 1e-5 <= float(view.min()) <= float(view.max()) <= high + 1e-5
    assert not torch.equal(*mri) and not torch.equal(*reid)
