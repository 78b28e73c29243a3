"""YAML configs fill typed dataclasses; overrides and errors behave as documented."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import pytest
import yaml

from conftest import REPO
from downstream.det.config import DetConfig
from downstream.reid.config import ReIDConfig
from downstream.seg.config import SegConfig
from pretrain.config import PretrainConfig
from twinview.config import (
    ConfigError,
    Multiple,
    PositiveInt,
    Range,
    from_dict,
    load_config,
    save_config,
    to_dict,
)

CONFIGS = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))


def test_there_is_a_config_per_method_and_data_set() -> None:
    names = {p.stem for p in CONFIGS}
    for data in ("market", "hippocampus2d", "hippocampus3d"):
        for method in ("simclr", "moco", "byol", "simsiam"):
            assert f"{data}_{method}" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_names_its_method(path: Path) -> None:
    cfg = load_config(PretrainConfig, path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.method.name == raw["method"]["name"]
    assert cfg.out_dir == raw["out_dir"]
    assert len(cfg.data.size) == (3 if cfg.data.kind == "msd_3d" else 2)


def test_overrides_are_typed_and_applied_in_order() -> None:
    overrides = ["train.epochs=3", "optim.lr=1", "data.size=[16, 8]", "train.epochs=4", "train.amp=fp32"]
    cfg = load_config(PretrainConfig, CONFIGS[0], overrides)
    assert cfg.train.epochs == 4
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.size == [16, 8]
    assert cfg.train.amp == "fp32"
    cfg = load_config(PretrainConfig, CONFIGS[0], ["optim.lr=3e-3", "optim.weight_decay=+1E-2"])
    assert cfg.optim.lr == 0.003 and cfg.optim.weight_decay == 0.01  # YAML 1.1 reads these as strings
    with pytest.raises(ConfigError, match=r"optim.weight_decay: -100.0 is not >= 0"):
        load_config(PretrainConfig, CONFIGS[0], ["optim.weight_decay=-1E+2"])  # signed, and still checked


@pytest.mark.parametrize("override, words", [
    (["train.epoch=3"], "unknown key(s) ['epoch']"),
    (["method.name=swav"], "'swav' is not one of"),
    (["train.epochs=three"], "expected int"),
    (["optim.lr=fast"], "expected float"),
    (["train.deterministic=1"], "expected bool"),
    (["train"], "expected key=value"),
    (["data.size=[64"], "--set 'data.size=[64': the value is not valid YAML"),
])
def test_bad_overrides_name_the_key(override: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load_config(PretrainConfig, CONFIGS[0], override)
    assert words in str(err.value)


def test_bad_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 2, unknown_thing: 1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, bad)
    assert str(bad) in str(err.value) and "unknown_thing" in str(err.value)
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PretrainConfig, bad)


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(PretrainConfig, CONFIGS[0], ["train.seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(PretrainConfig, tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert again.train.seed == 7


# --------------------------------------------------------------------------- domains of values

CONFIG_CLASSES = {"pretrain": PretrainConfig, "seg": SegConfig, "reid": ReIDConfig, "det": DetConfig}
ALL_CONFIGS = sorted((REPO / "configs").glob("*/*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_config_is_within_its_domains(path: Path) -> None:
    cfg = load_config(CONFIG_CLASSES[path.parent.name], path)
    assert to_dict(cfg)  # and the defaults themselves:
    assert to_dict(load_config(CONFIG_CLASSES[path.parent.name], None))


@pytest.mark.parametrize("cls, override, message", [
    (PretrainConfig, "optim.lr=-0.1", "optim.lr: -0.1 is not > 0"),
    (PretrainConfig, "optim.lr=0", "optim.lr: 0.0 is not > 0"),
    (PretrainConfig, "train.batch_size=0", "train.batch_size: 0 is not > 0"),
    (PretrainConfig, "train.epochs=-1", "train.epochs: -1 is not > 0"),
    (PretrainConfig, "train.keep_last=0", "train.keep_last: 0 is not > 0"),
    (PretrainConfig, "train.ckpt_every_steps=0", "train.ckpt_every_steps: 0 is not > 0"),
    (PretrainConfig, "train.seed=-1", "train.seed: -1 is not >= 0"),
    (PretrainConfig, "data.size=[64,0]", "data.size[1]: 0 is not > 0"),
    (PretrainConfig, "data.channels=0", "data.channels: 0 is not > 0"),
    (PretrainConfig, "data.slice_axis=3", "data.slice_axis: 3 is not in [0, 2]"),
    (PretrainConfig, "method.temperature=0", "method.temperature: 0.0 is not > 0"),
    (PretrainConfig, "method.tau_base=1.5", "method.tau_base: 1.5 is not in [0, 1]"),
    (PretrainConfig, "optim.momentum=1", "optim.momentum: 1.0 is not in [0, 1)"),
    (PretrainConfig, "optim.grad_clip=-1", "optim.grad_clip: -1.0 is not >= 0"),
    (PretrainConfig, "train.knn_temperature=.nan", "train.knn_temperature: nan is not a finite number"),
    (SegConfig, "optim.lr=-0.1", "optim.lr: -0.1 is not > 0"),
    (SegConfig, "data.pos_fraction=1.5", "data.pos_fraction: 1.5 is not in [0, 1]"),
    (SegConfig, "data.label_fraction=0", "data.label_fraction: 0.0 is not in (0, 1]"),
    (SegConfig, "train.overlap=1.0", "train.overlap: 1.0 is not in [0, 1)"),
    (SegConfig, "data.roi=[64,-64,64]", "data.roi[1]: -64 is not > 0"),
    (SegConfig, "data.spacing=[1,1,0]", "data.spacing[2]: 0.0 is not > 0"),
    (SegConfig, "data.spatial_dims=1", "data.spatial_dims: 1 is not one of [2, 3]"),
    (SegConfig, "data.spatial_dims=2.0", "data.spatial_dims: 2.0 is not one of [2, 3]"),
    (SegConfig, "data.test_cases=-2", "data.test_cases: -2 is not >= 0"),
    (SegConfig, "data.flip_axes=[0,3]", "data.flip_axes[1]: 3 is not in [0, 2]"),
    (SegConfig, "model.unet_channels=[8,0,32]", "model.unet_channels[1]: 0 is not > 0"),
    (SegConfig, "train.log_every_steps=0", "train.log_every_steps: 0 is not > 0"),
    (SegConfig, "optim.warmup_steps=-5", "optim.warmup_steps: -5 is not >= 0"),
    (ReIDConfig, "train.p=1", "train.p: 1 is not >= 2"),
    (ReIDConfig, "train.k=1", "train.k: 1 is not >= 2"),
    (ReIDConfig, "loss.margin=0", "loss.margin: 0.0 is not > 0"),
    (ReIDConfig, "loss.label_smoothing=1", "loss.label_smoothing: 1.0 is not in [0, 1)"),
    (ReIDConfig, "optim.gamma=0", "optim.gamma: 0.0 is not in (0, 1]"),
    (ReIDConfig, "optim.milestones=[40,-1]", "optim.milestones[1]: -1 is not >= 0"),
    (ReIDConfig, "eval.lambda_value=2", "eval.lambda_value: 2.0 is not in [0, 1]"),
    (ReIDConfig, "eval.k1=0", "eval.k1: 0 is not > 0"),
    (ReIDConfig, "model.last_stride=3", "model.last_stride: 3 is not one of [1, 2]"),
    (ReIDConfig, "model.last_stride=true", "model.last_stride: True is not one of [1, 2]"),
    (ReIDConfig, "optim.backbone_lr_mult=-0.5", "optim.backbone_lr_mult: -0.5 is not >= 0"),
], ids=lambda v: v if isinstance(v, str) and "=" in v and ":" not in v else "")
def test_values_outside_their_domain_name_the_key_and_rule(cls: type, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(cls, None, [override])
    assert str(err.value) == message  # no file: the reason alone, no "<no path>" or "config:" prefix
    assert err.value.path is None


def test_a_bad_value_in_a_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.yaml"
    bad.write_text("optim: {lr: -0.1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(SegConfig, bad)
    assert str(err.value) == f"{bad}: optim.lr: -0.1 is not > 0"
    assert "<no path>" not in str(err.value)
    with pytest.raises(ConfigError) as err:  # an override on top of a file is named with the file too
        load_config(ReIDConfig, REPO / "configs/reid/market.yaml", ["train.k=1"])
    assert str(err.value).endswith("market.yaml: train.k: 1 is not >= 2")


BOUNDARY = {
    PretrainConfig: ["optim.weight_decay=0", "optim.grad_clip=0", "train.max_steps=0", "train.seed=0",
                     "train.knn_every_epochs=0", "data.workers=0", "optim.warmup_epochs=0",
                     "optim.momentum=0", "method.momentum=1", "method.tau_base=0", "train.keep_last=1",
                     "data.slice_axis=0"],
    SegConfig: ["data.label_fraction=1.0", "data.pos_fraction=0", "data.pos_fraction=1", "train.overlap=0",
                "data.test_cases=0", "data.val_cases=0", "train.val_every_steps=0", "optim.warmup_steps=0",
                "model.encoder_lr_mult=0", "data.spatial_dims=2", "data.flip_axes=[0,2]",
                "data.spacing=null"],
    ReIDConfig: ["train.p=2", "train.k=2", "loss.margin=null", "loss.label_smoothing=0", "optim.gamma=1",
                 "eval.lambda_value=0", "eval.lambda_value=1", "eval.k1=1", "eval.k2=1",
                 "model.last_stride=2", "optim.warmup_epochs=0", "loss.id_weight=0", "optim.milestones=[]"],
}


@pytest.mark.parametrize("cls, override", [(c, o) for c, items in BOUNDARY.items() for o in items],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_values_on_the_boundary_are_accepted(cls: type, override: str) -> None:
    cfg = to_dict(load_config(cls, None, [override]))
    key, _, raw = override.partition("=")
    section, name = key.split(".")
    expected = yaml.safe_load(raw)
    assert cfg[section][name] == expected
    assert type(cfg[section][name]) in (type(expected), float)  # YAML ints fill float fields as floats


def test_defaults_are_unchanged() -> None:
    seg, reid, pre = SegConfig(), ReIDConfig(), PretrainConfig()
    assert (pre.optim.lr, pre.optim.momentum, pre.train.keep_last, pre.data.slice_axis) == (0.06, 0.9, 2, 2)
    assert (seg.data.spatial_dims, seg.data.pos_fraction, seg.train.overlap, seg.data.label_fraction) == (
        3, 0.67, 0.25, 1.0)
    assert (reid.train.p, reid.train.k, reid.loss.margin, reid.model.last_stride) == (16, 4, 0.3, 1)


@dataclass
class _Annotated:
    sizes: list[Annotated[int, Range(ge=1, le=8)]] = field(default_factory=lambda: [1, 2])
    rois: Annotated[list[int], Multiple(16)] = field(default_factory=lambda: [32, 16])
    step: Annotated[int, Multiple(4), Range(gt=0)] = 4
    optional: PositiveInt | None = None


def test_annotated_list_items_name_their_index() -> None:
    assert from_dict(_Annotated, {"sizes": [8, 1], "rois": [], "step": 8}).sizes == [8, 1]
    with pytest.raises(ConfigError, match=r"^sizes\[2\]: 9 is not in \[1, 8\]$"):
        from_dict(_Annotated, {"sizes": [1, 2, 9]})
    with pytest.raises(ConfigError, match=r"^rois\[1\]: 40 is not a multiple of 16$"):
        from_dict(_Annotated, {"rois": [16, 40]})
    with pytest.raises(ConfigError, match=r"^step: 6 is not a multiple of 4$"):
        from_dict(_Annotated, {"step": 6})
    with pytest.raises(ConfigError, match=r"^step: 0 is not > 0$"):
        from_dict(_Annotated, {"step": 0})
    with pytest.raises(ConfigError, match=r"^sizes\[0\]: expected int, got 'a'$"):
        from_dict(_Annotated, {"sizes": ["a"]})
    assert from_dict(_Annotated, {"optional": None}).optional is None
    with pytest.raises(ConfigError, match=r"^optional: -3 is not > 0$"):
        from_dict(_Annotated, {"optional": -3})


def test_range_describes_its_rule() -> None:
    assert Range(gt=0).describe() == "> 0"
    assert Range(ge=2).describe() == ">= 2"
    assert Range(ge=0, lt=1).describe() == "in [0, 1)"
    assert Range(gt=0, le=1).describe() == "in (0, 1]"
    assert Range(lt=5).describe() == "< 5"
