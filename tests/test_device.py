"""The device seam: the default follows the machine, and a missing CUDA device is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from p2prec.sim.cli import main
from p2prec.sim.device import resolve_device
from tests.conftest import TINY


@pytest.mark.parametrize("present", [True, False])
def test_auto_is_cuda_exactly_when_torch_sees_one(monkeypatch: pytest.MonkeyPatch, present: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: present)
    assert resolve_device("auto").type == ("cuda" if present else "cpu")
    assert resolve_device("cpu").type == "cpu"


def test_asking_for_a_missing_cuda_is_a_one_line_error_before_any_work(tmp_path: Path, synth_dir: Path,
                                                                       cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["--data-dir", str(synth_dir), "--device", "cuda", "--out", str(tmp_path / "run")]
    for override in TINY:
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["p2prec: error: sim.device = 'cuda': torch sees no CUDA device here; use --device cpu (or auto)"]
    assert not (tmp_path / "run").exists() and not cache_dir.exists()


def test_the_simulator_runs_on_the_device_it_is_given(synth_dir: Path, synth_data) -> None:  # noqa: ANN001
    from tests.test_backends import _setup
    from p2prec.sim.engine import Simulation

    cfg, backbone, graph = _setup(synth_dir, synth_data, ["sim.device=cpu"])
    sim = Simulation(cfg, synth_data, backbone, graph)
    sim.step(1)
    assert {v.device.type for v in sim.pop.params.values()} == {"cpu"}
    assert sim.evaluate()["val"]["sampled"]["ndcg@10"] >= 0.0
