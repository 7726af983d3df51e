"""Loaders, the leave-one-out split, user split, synthetic generator and data errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from p2prec.data import load_dataset
from p2prec.data.movielens import DataError, Ratings, locate, read_ratings
from p2prec.data.split import build_dataset
from p2prec.data.synthetic import generate
from tests.conftest import ml100k_dir


def _ratings(rows: list[tuple[int, int, int]]) -> Ratings:
    a = np.asarray(rows, dtype=np.int64)
    return Ratings(a[:, 0], a[:, 1], a[:, 2], Path("mem"), "x")


def test_split_holds_out_last_two_by_timestamp() -> None:
    rows = [(1, 10, 300), (1, 11, 100), (1, 12, 200), (1, 13, 400),
            (2, 10, 50), (2, 14, 10), (2, 15, 30)]
    d = build_dataset(_ratings(rows), public_fraction=0.0)
    idx = {int(i): k + 1 for k, i in enumerate(d.item_ids)}
    u1 = int(np.flatnonzero(d.user_ids == 1)[0])
    assert d.test_item[u1] == idx[13] and d.val_item[u1] == idx[10]
    assert list(d.train[u1]) == [idx[11], idx[12]]
    u2 = int(np.flatnonzero(d.user_ids == 2)[0])
    assert d.test_item[u2] == idx[10] and d.val_item[u2] == idx[15] and list(d.train[u2]) == [idx[14]]


def test_equal_timestamps_keep_file_order_and_short_users_are_dropped() -> None:
    rows = [(1, 1, 5), (1, 2, 5), (1, 3, 5), (2, 1, 1), (2, 2, 2)]
    d = build_dataset(_ratings(rows), public_fraction=0.0)
    assert list(d.user_ids) == [1]
    assert d.val_item[0] == 2 and d.test_item[0] == 3


def test_synthetic_split_invariants(synth_data) -> None:  # noqa: ANN001
    d = synth_data
    for u in range(d.n_users):
        assert d.test_item[u] not in d.train[u] and d.val_item[u] not in d.train[u]
        assert d.test_item[u] != d.val_item[u]
    assert set(d.public_users).isdisjoint(d.federated_users)
    assert len(d.public_users) + len(d.federated_users) == d.n_users
    assert len(d.public_users) == round(0.2 * d.n_users)
    nodes = d.nodes(3)
    assert np.array_equal(np.concatenate(nodes), d.federated_users) and all(len(n) <= 3 for n in nodes)


def test_user_split_is_seeded(synth_dir: Path) -> None:
    a = load_dataset("synthetic", str(synth_dir), 0.2, 1)
    b = load_dataset("synthetic", str(synth_dir), 0.2, 1)
    c = load_dataset("synthetic", str(synth_dir), 0.2, 2)
    assert np.array_equal(a.public_users, b.public_users)
    assert not np.array_equal(a.public_users, c.public_users)


def test_synthetic_generator_is_deterministic(tmp_path: Path) -> None:
    generate(tmp_path / "a", users=20, items=40, seed=3)
    generate(tmp_path / "b", users=20, items=40, seed=3)
    generate(tmp_path / "c", users=20, items=40, seed=4)
    a, b, c = ((tmp_path / x / "u.data").read_bytes() for x in "abc")
    assert a == b and a != c


@pytest.mark.skipif(ml100k_dir() is None, reason="ML-100K is not present on this machine")
def test_ml100k_loads_and_splits_by_timestamp() -> None:
    folder = ml100k_dir()
    r = read_ratings("ml-100k", folder)
    assert len(r.users) == 100_000 and r.checksum == "6e47046882bad158b0efbb84cd5cb987"
    assert r.meta[1].title == "Toy Story (1995)"
    assert r.meta[1].text == "Toy Story (1995). Animation, Children's, Comedy."
    d = build_dataset(r, public_fraction=0.2, seed=0)
    assert d.n_users == 943 and d.n_items == 1682 and len(d.federated_users) == 754
    last = {}
    for user, item, stamp in zip(r.users, r.items, r.timestamps):
        if user not in last or stamp >= last[user][0]:
            last[user] = (stamp, item)
    for u in range(d.n_users):
        raw_test = d.item_ids[d.test_item[u] - 1]
        stamp, _ = last[int(d.user_ids[u])]
        on_last_stamp = r.items[(r.users == d.user_ids[u]) & (r.timestamps == stamp)]
        assert raw_test in on_last_stamp


@pytest.mark.parametrize("name,filename,content,needle", [
    ("ml-100k", "u.data", "1\t2\t3\t4\n1\t2\t3\n", "u.data:2: expected 4 fields"),
    ("ml-100k", "u.data", "1\t2\t3\t4\nx\t2\t3\t4\n", "u.data:2: non-numeric"),
    ("ml-1m", "ratings.dat", "1::2::3::4\n1::2::3\n", "ratings.dat:2"),
    ("ml-latest", "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,4\n1,b,3,4\n", "ratings.csv:3"),
    ("ml-100k", "u.data", "", "no ratings"),
])
def test_malformed_files_name_file_and_line(tmp_path: Path, name: str, filename: str, content: str,
                                            needle: str) -> None:
    (tmp_path / filename).write_text(content)
    with pytest.raises(DataError, match=needle.replace(".", r"\.")):
        read_ratings(name, tmp_path)


def test_missing_data_names_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path)):
        locate("ml-100k", tmp_path)


def test_locate_accepts_parent_folder_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generate(tmp_path / "ml-100k", users=10, items=20, communities=2, seed=0)
    assert locate("ml-100k", tmp_path) == tmp_path / "ml-100k"
    monkeypatch.setenv("P2PREC_DATA", str(tmp_path))
    assert locate("ml-100k") == tmp_path / "ml-100k"
