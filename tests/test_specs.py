"""The experiment specs in ``sim/``: every one loads, says what it shows, and is cited.

Why: each figure in the README and in ``docs/experiments.md`` names the spec that reproduces
it. A spec that no longer validates, or one that no page names, is a figure nobody can rerun
or a file nobody needs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from p2prec.config import load
from p2prec.gossip.codecs import codec_from_config

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted(ROOT.joinpath("sim").rglob("*.toml"))


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def test_the_spec_set_is_small_and_grouped() -> None:
    assert 0 < len(SPECS) <= 35
    for spec in SPECS:
        assert spec.parent.parent == ROOT / "sim", f"{spec}: specs sit one folder deep, grouped by study"
        assert spec.parent.name != "base", f"{spec}: no base of old defaults; old figures live at their commit"


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_every_spec_loads_on_its_own(spec: Path) -> None:
    """Loads under today's schema, and names a codec the registry knows (gossip checks its own names)."""
    codec_from_config(load(spec).gossip)


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_every_spec_opens_with_what_it_shows(spec: Path) -> None:
    first = spec.read_text(encoding="utf-8").splitlines()[0]
    assert re.match(r"# \S", first), f"{spec}: the first line is a comment saying what the spec shows"


def test_every_spec_is_cited() -> None:
    pages = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "README.md", ROOT / "docs" / "experiments.md")
                    if p.is_file())
    missing = [name for name in _ids(SPECS) if name not in pages]
    assert not missing, f"specs named in neither README.md nor docs/experiments.md: {missing}"


def test_reproduce_script_knows_every_group() -> None:
    script = (ROOT / "sim" / "reproduce.sh").read_text(encoding="utf-8")
    groups = re.search(r'^all="([^"]*)"', script, re.M)
    assert groups is not None
    assert set(groups.group(1).split()) == {spec.parent.name for spec in SPECS}
