"""The ``p2prec`` and ``p2prec-sim`` commands end to end on synthetic data: pretrain, baselines, report, errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from p2prec.cli import main
from p2prec.gossip.privacy import noise_for_epsilon
from p2prec.model.store import load_backbone
from p2prec.sim.cli import main as sim_main
from tests.conftest import TINY

SETS = [a for o in TINY for a in ("--set", o)]


@pytest.mark.slow
def test_pretrain_baselines_and_report(tmp_path: Path, synth_dir: Path, synth_data, cache_dir: Path,  # noqa: ANN001
                                       capsys: pytest.CaptureFixture) -> None:
    data = ["--dataset", "synthetic", "--data-dir", str(synth_dir)]
    # Without --dataset, pretrain uses the public users of data.name, disjoint from the nodes.
    assert main(["pretrain", "--data-dir", str(synth_dir), "--out", str(tmp_path / "bb"), *SETS]) == 0
    assert load_backbone(tmp_path / "bb") is not None
    runs = []
    for method in ("backbone-only", "centralized", "local-only"):
        out = tmp_path / method
        assert sim_main(["--method", method, *data, "--backbone", str(tmp_path / "bb"), "--out", str(out),
                         "--rounds", "3", "--set", "central.epochs=3", *SETS]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["method"] == method and summary["nodes"] == len(synth_data.federated_users)
        assert {"sampled", "full"} <= set(summary["test_at_best"])
        assert (out / "convergence.png").stat().st_size > 0
        runs.append(str(out))
    capsys.readouterr()
    assert main(["report", *runs, "--plot", str(tmp_path / "overlay.png")]) == 0
    table = capsys.readouterr().out
    for run in runs:
        summary = json.loads((Path(run) / "summary.json").read_text())
        row = next(line for line in table.splitlines() if line.startswith(f"| {summary['label']} |"))
        assert f"| {summary['val_at_best']['sampled']['ndcg@10']:.4f} |" in row
    assert (tmp_path / "overlay.png").stat().st_size > 0


def test_a_run_without_backbone_pretrains_and_caches(tmp_path: Path, synth_dir: Path, cache_dir: Path) -> None:
    args = ["--method", "backbone-only", "--dataset", "synthetic", "--data-dir", str(synth_dir),
            "--out", str(tmp_path / "r"), *SETS]
    assert sim_main(args) == 0
    cached = list((cache_dir / "backbones").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    assert sim_main(args) == 0
    assert list((cache_dir / "backbones").iterdir()) == cached


def test_privacy_prints_the_noise_for_a_target_epsilon_and_its_snr_bound(synth_dir: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    assert main(["privacy", "--dataset", "synthetic", "--data-dir", str(synth_dir), "--set", "run.rounds=40",
                 "--set", "privacy.target_epsilon=4"]) == 0
    out = capsys.readouterr().out
    sigma = noise_for_epsilon(4.0, 40, 1e-5)
    assert "40 releases each" in out and f"noise multiplier {sigma:.3f}: epsilon 4.000" in out
    assert "best-case signal-to-noise" in out
    assert main(["privacy", "--dataset", "synthetic", "--data-dir", str(synth_dir), "--set",
                 "privacy.noise_multiplier=0"]) == 2
    assert "set privacy.target_epsilon" in capsys.readouterr().err


@pytest.mark.parametrize("command,args,needle", [
    (sim_main, ["--method", "centralized", "--data-dir", "/nonexistent", "--out", "x"], "no u.data"),
    (main, ["pretrain", "--set", "train.nope=1", "--out", "x"], "train.nope"),
    (sim_main, ["--method", "centralized", "--backbone", "/nonexistent", "--dataset", "synthetic",
                "--out", "x"], "not a p2prec backbone"),
    (main, ["report", "/nonexistent"], "missing"),
])
def test_user_errors_are_one_line(command: Callable[[list[str]], int], args: list[str], needle: str, synth_dir: Path,
                                  cache_dir: Path, capsys: pytest.CaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2PREC_DATA", str(synth_dir))
    assert command(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
