"""The label-efficiency recipe: which runs it asks for, named how."""

from __future__ import annotations

from pathlib import Path

from downstream.recipes import encoder_starts, label_efficiency, label_tag, parse_labels, parse_steps


def test_label_efficiency_crosses_starts_with_fractions_and_counts(tmp_path: Path) -> None:
    calls: list[tuple[Path, list[str]]] = []

    def fake_finetune(config: Path, overrides: list[str]) -> dict:
        calls.append((config, overrides))
        return {"score": len(calls)}

    starts = {**encoder_starts("runs/enc"), "both": ["model.encoder_weights=runs/loc",
                                                     "model.decoder_weights=runs/loc"]}
    plan = [(2, 0, ["train.steps=5"]), (0.25, 1, [])]
    rows = label_efficiency(Path("c.yaml"), tmp_path, starts, plan, ["data.path=d"], finetune=fake_finetune)
    assert [(r["arm"], r["labels"], r["fraction"], r["seed"]) for r in rows] == [
        ("pretrained", 2, None, 0), ("random", 2, None, 0), ("both", 2, None, 0),
        ("pretrained", 0.25, 0.25, 1), ("random", 0.25, 0.25, 1), ("both", 0.25, 0.25, 1)]
    first, last = calls[0][1], calls[-1][1]
    assert first == ["data.path=d", f"out_dir={tmp_path / 'runs/pretrained_n2_s0'}", "data.label_cases=2",
                     "train.seed=0", "model.encoder_weights=runs/enc", "train.steps=5"]
    assert f"out_dir={tmp_path / 'runs/both_f0.25_s1'}" in last and "data.label_fraction=0.25" in last
    assert "model.decoder_weights=runs/loc" in last
    assert calls[1][1][4] == "model.encoder_weights="  # random init
    assert [label_tag(x) for x in (1, 1.0, 0.05)] == ["n1", "f1", "f0.05"]


def test_label_settings_parse_as_counts_or_fractions() -> None:
    assert parse_labels("n2") == 2 and isinstance(parse_labels("n2"), int)
    assert parse_labels("1") == 1.0 and isinstance(parse_labels("1"), float)
    # one labelled case and 100 % are different settings, though 1 == 1.0
    assert parse_steps("n1:100,0.05:150,1.0:800") == {"n1": 100, "f0.05": 150, "f1": 800}
