"""Config loading: unknown keys, bad values and bad files are one-line errors naming them."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2prec.config import ConfigError, load


def test_defaults_and_overrides() -> None:
    cfg = load(None, ["train.lr=0.01", "adapter.targets_shared=query,value", "model.causal=false"])
    assert cfg.train.lr == 0.01 and cfg.adapter.targets_shared == ["query", "value"]
    assert cfg.model.causal is False


@pytest.mark.parametrize("override,needle", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("nosuch.key=1", "unknown config section 'nosuch'"),
    ("train.lr=-1", "train.lr"),
    ("train.loss=hinge", "train.loss"),
    ("model.layers=two", "model.layers: expected an integer"),
    ("model.hidden=33", "not divisible"),
    ("train.lr", "expected section.key=value"),
])
def test_bad_overrides_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        load(None, [override])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[train]\nepochs = 3\n")
    with pytest.raises(ConfigError, match="train.epochs"):
        load(unknown)


def test_extends_applies_the_base_first_and_the_file_wins(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "old.toml").write_text("[train]\nlr = 0.02\nnegatives = 7\n")
    spec = tmp_path / "spec.toml"
    spec.write_text('extends = "base/old.toml"\n[train]\nnegatives = 9\n')
    cfg = load(spec, ["train.lr=0.5"])
    assert (cfg.train.lr, cfg.train.negatives) == (0.5, 9)
    assert load(spec).train.lr == 0.02


@pytest.mark.parametrize("text,needle", [
    ('extends = "nowhere.toml"', "config file not found: .*nowhere.toml"),
    ('extends = "spec.toml"', "spec.toml: 'extends' loops back"),
    ("extends = 3", "'extends' must be a file path"),
])
def test_bad_extends_is_named(tmp_path: Path, text: str, needle: str) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(text + "\n")
    with pytest.raises(ConfigError, match=needle):
        load(spec)


def test_toml_round_trip(tmp_path: Path) -> None:
    cfg = load(None, ["train.lr=0.02", "data.name=synthetic"])
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load(path).to_dict() == cfg.to_dict()
