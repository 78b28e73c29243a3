"""YAML configs fill typed dataclasses; overrides and errors behave as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO
from pretrain.config import PretrainConfig
from twinview.config import ConfigError, load_config, save_config, to_dict

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
    cfg = load_config(PretrainConfig, CONFIGS[0], ["optim.lr=3e-3", "optim.weight_decay=-1E+2"])
    assert cfg.optim.lr == 0.003 and cfg.optim.weight_decay == -100.0  # YAML 1.1 reads these as strings


@pytest.mark.parametrize("override, words", [
    (["train.epoch=3"], "unknown key(s) ['epoch']"),
    (["method.name=swav"], "'swav' is not one of"),
    (["train.epochs=three"], "expected int"),
    (["optim.lr=fast"], "expected float"),
    (["train.deterministic=1"], "expected bool"),
    (["train"], "expected key=value"),
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
