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
    unknown.write_text('extends = "base.toml"\n')
    with pytest.raises(ConfigError, match="unknown config section 'extends'"):
        load(unknown)


@pytest.mark.parametrize("key,home", [("sim.rounds", "run.rounds"), ("sim.baseline", "run.method"),
                                      ("gossip.seed", "run.seed"), ("gossip.int8_block", "gossip.quant_block")])
def test_a_key_that_moved_names_its_new_home(key: str, home: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'.*now '{home}'"):
        load(None, [f"{key}=1"])


def test_toml_round_trip(tmp_path: Path) -> None:
    cfg = load(None, ["train.lr=0.02", "data.name=synthetic"])
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load(path).to_dict() == cfg.to_dict()
