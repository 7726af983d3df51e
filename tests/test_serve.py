"""Serving: ``p2prec-sim --save-states`` writes a state folder, ``p2prec recommend`` answers from it,
and every way a state can be wrong is a one-line error."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2prec.cli import main as p2prec_main
from p2prec.data.split import Dataset
from p2prec.model.backbone import build_backbone
from p2prec.model.store import save_backbone
from p2prec.run import checkpoint
from p2prec.serve.recommend import Recommender, recommend
from p2prec.serve.state import MANIFEST, read_manifest
from p2prec.sim.cli import main as sim_main
from tests.conftest import TINY

SETS = TINY + ["model.text_encoder=none"]


def _backbone(data: Dataset, folder: Path, seed: int) -> Path:
    """A random (not pre-trained) id-only backbone: enough to serve, and quick."""
    save_backbone(build_backbone(data.n_items, 16, 1, 1, 32, 12, seed=seed), folder, data.item_ids)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, synth_dir: Path, synth_data: Dataset) -> Iterator[Path]:
    """A tiny simulation saved with ``--save-states``, on a backbone in its own folder."""
    tmp = tmp_path_factory.mktemp("serve")
    backbone = _backbone(synth_data, tmp / "backbone", seed=2)
    out = tmp / "run"
    args = ["--dataset", "synthetic", "--data-dir", str(synth_dir), "--rounds", "2", "--nodes", "8",
            "--topology", "ring", "--backbone", str(backbone), "--out", str(out), "--save-states"]
    assert sim_main(args + [a for o in SETS for a in ("--set", o)]) == 0
    yield out


def _user(run: Path) -> int:
    return min(read_manifest(run).users)


def test_save_states_writes_the_documented_layout(run: Path) -> None:
    state = run / "state"
    manifest = json.loads((state / MANIFEST).read_text())
    assert manifest["format"] == "p2prec-serving" and manifest["round"] == 2
    assert len(manifest["users"]) == 8 and (state / "config.toml").is_file()
    for entry in manifest["users"].values():
        ckpt = checkpoint.load(state / entry["checkpoint"], entry["node"])
        assert ckpt.round == 2 and all(k.startswith("param/") for k in ckpt.tensors)


def test_recommend_prints_k_unseen_titled_items_as_the_function_returns(run: Path, synth_data: Dataset,
                                                                       capsys: pytest.CaptureFixture) -> None:
    user = _user(run)
    assert p2prec_main(["recommend", "--state", str(run), "--user", str(user), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    found = recommend(run, user)
    assert printed == {"user": user, "items": [vars(r) for r in found]}
    assert len(found) == 10 and all(r.title for r in found)
    assert [r.score for r in found] == sorted((r.score for r in found), reverse=True)
    u = int(list(synth_data.user_ids).index(user))
    seen = {int(synth_data.item_ids[i - 1]) for i in synth_data.interacted(u)}
    assert not seen & {r.item for r in found}
    assert p2prec_main(["recommend", "--state", str(run / "state"), "--user", str(user), "--k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and found[0].title in lines[0]


def test_one_recommender_serves_every_user_of_the_state(run: Path) -> None:
    served = Recommender.open(run)
    answers = {u: served.recommend(u, 5) for u in served.users}
    assert len(answers) == 8 and all(len(a) == 5 for a in answers.values())
    first = served.users[0]
    assert served.recommend(first, 5) == answers[first]


@pytest.mark.parametrize("case", ["unknown-user", "public-user", "no-state", "not-a-state", "damaged-manifest",
                                  "damaged-checkpoint", "other-backbone", "other-data", "bad-k"])
def test_recommend_errors_are_one_line(case: str, run: Path, tmp_path: Path, synth_data: Dataset,
                                       capsys: pytest.CaptureFixture) -> None:
    state = tmp_path / "copy"
    shutil.copytree(run, state)
    user = _user(run)
    args = ["recommend", "--state", str(state), "--user", str(user)]
    needle = {"unknown-user": "user 999999 is not served", "public-user": "public users",
              "no-state": "no such state folder", "not-a-state": "not a p2prec state folder",
              "damaged-manifest": "is damaged", "other-backbone": "do not match",
              "other-data": "other data", "bad-k": "k must be at least 1"}.get(case)
    if case == "unknown-user":
        args[-1] = "999999"
    elif case == "public-user":
        args[-1] = str(int(synth_data.user_ids[synth_data.public_users[0]]))
    elif case == "no-state":
        args[2] = str(tmp_path / "nowhere")
    elif case == "not-a-state":
        args[2] = str(tmp_path)
        (state / "state" / MANIFEST).unlink()
    elif case == "damaged-manifest":
        (state / "state" / MANIFEST).write_text('{"format": "p2prec-serving", "version": 1, "users": [')
    elif case == "damaged-checkpoint":
        path = state / "state" / json.loads((state / "state" / MANIFEST).read_text())["users"][str(user)]["checkpoint"]
        path.write_bytes(path.read_bytes()[:-20])
        needle = "unreadable"
    elif case == "other-backbone":
        args += ["--backbone", str(_backbone(synth_data, tmp_path / "other", seed=3))]
    elif case == "other-data":
        manifest = json.loads((state / "state" / MANIFEST).read_text())
        manifest["data_checksum"] = "0" * 64
        (state / "state" / MANIFEST).write_text(json.dumps(manifest))
    elif case == "bad-k":
        args += ["--k", "0"]
    assert p2prec_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("p2prec: error:") and needle in err[0], err
