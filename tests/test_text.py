"""Item text, text encoders and the text-grounded backbone: readers, offline encoders, cold
items, scoring items never trained on, and serving another catalogue through text."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from p2prec.config import load
from p2prec.data import load_dataset
from p2prec.data.errors import DataError
from p2prec.data.items import read_items, title_key
from p2prec.data.sampler import NegativeSampler
from p2prec.learn.evaluate import COLD, build_eval_set, evaluate
from p2prec.learn.pretrain import ensure_backbone, fresh_backbone, save_pretrained
from p2prec.model import text as text_module
from p2prec.model.store import BackboneError, load_backbone
from p2prec.model.text import TextEncoderError, embed_texts
from p2prec.rng import seeded_rng
from tests.conftest import TINY

U_ITEM_OK = "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n" \
            "2|Untitled|01-Jan-1997||http://y|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"


def test_ml100k_item_text_and_year_from_release_date(tmp_path: Path) -> None:
    (tmp_path / "u.item").write_text(U_ITEM_OK, encoding="latin-1")
    items = read_items("ml-100k", tmp_path)
    assert items[1].text == "Toy Story (1995). Animation, Children's, Comedy."
    assert items[2].title == "Untitled (1997)" and items[2].text == "Untitled (1997)."


@pytest.mark.parametrize(("name", "file", "content", "problem"), [
    ("ml-100k", "u.item", "1|Toy Story (1995)|01-Jan-1995||x|0|1\n", "u.item:1: expected 24 fields"),
    ("ml-100k", "u.item", U_ITEM_OK + "3|Bad|01-Jan-1995||x|" + "|".join(["2"] * 19) + "\n", "u.item:3: genre flags"),
    ("ml-100k", "u.item", "x|T|d||u|" + "|".join(["0"] * 19) + "\n", "u.item:1: item id"),
    ("ml-1m", "movies.dat", "1::Toy Story (1995)::Animation\n2::Broken\n", "movies.dat:2: expected 3 fields"),
    ("ml-latest", "movies.csv", "movieId,title,genres\n1,Toy Story (1995)\n", "movies.csv:2: expected 3"),
])
def test_malformed_metadata_names_file_and_line(tmp_path: Path, name: str, file: str, content: str,
                                                problem: str) -> None:
    (tmp_path / file).write_text(content, encoding="latin-1")
    with pytest.raises(DataError, match=problem):
        read_items(name, tmp_path)


def test_ml1m_and_ml_latest_formats(tmp_path: Path) -> None:
    (tmp_path / "movies.dat").write_text("1::Toy Story (1995)::Animation|Children's|Comedy\n", encoding="latin-1")
    (tmp_path / "movies.csv").write_text('movieId,title,genres\n11,"American President, The (1995)",'
                                         'Comedy|Drama\n12,Nothing (2000),(no genres listed)\n', encoding="utf-8")
    assert read_items("ml-1m", tmp_path)[1].text == "Toy Story (1995). Animation, Children's, Comedy."
    latest = read_items("ml-latest", tmp_path)
    assert latest[11].text == "American President, The (1995). Comedy, Drama."
    assert latest[12].text == "Nothing (2000)."
    assert title_key("American President, The (1995)") == title_key("american president the 1995")


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every attempt to open a connection is recorded and refused."""
    attempts: list[tuple] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_wordllama_runs_offline_and_is_cached(tmp_path: Path, no_network: list[tuple],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    texts = ["Toy Story (1995). Animation, Children's, Comedy.", "Heat (1995). Action, Crime, Thriller."]
    first = embed_texts(texts, "wordllama", tmp_path)
    assert first.shape == (2, 256) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(first[0], first[1])
    assert no_network == []
    monkeypatch.setattr(text_module, "_wordllama", lambda cache_dir: pytest.fail("not read from the cache"))
    np.testing.assert_array_equal(embed_texts(texts, "wordllama", tmp_path), first)


def _tiny_hf_encoder(folder: Path) -> Path:
    """A 2-layer BERT with a word-level tokenizer, built from a config and saved: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "toy", "story", "heat", "action", "comedy", "(1995)", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(folder)
    return folder


def test_local_hugging_face_encoder_is_mean_pooled(tmp_path: Path, no_network: list[tuple]) -> None:
    folder = _tiny_hf_encoder(tmp_path / "enc")
    out = embed_texts(["toy story (1995)", "heat action", "toy story (1995)"], str(folder), tmp_path / "cache")
    assert out.shape == (3, 8)
    np.testing.assert_allclose(out[0], out[2])
    assert not np.allclose(out[0], out[1]) and no_network == []
    with pytest.raises(TextEncoderError, match="neither 'wordllama'"):
        embed_texts(["x"], str(tmp_path / "missing"), tmp_path / "cache")


def test_cold_items_leave_every_training_path(synth_dir: Path) -> None:
    data = load_dataset("synthetic", str(synth_dir), 0.2, 0, cold_items=0.25)
    assert len(data.cold_items) == 20
    assert not any(np.isin(seq, data.cold_items).any() for seq in data.train)
    drawn = NegativeSampler(data).sample(np.arange(data.n_users), (50,), seeded_rng(0))
    assert not np.isin(drawn, data.cold_items).any()
    plain = load_dataset("synthetic", str(synth_dir), 0.2, 0)
    np.testing.assert_array_equal(plain.test_item, data.test_item)


@pytest.fixture()
def text_cfg(synth_dir: Path):  # noqa: ANN201
    """The tiny test config with a WordLlama text path, whatever the project's default encoder."""
    return load(None, TINY + [f"data.dir={synth_dir}", "model.text_encoder=wordllama"])


@pytest.fixture()
def cold_cfg(synth_dir: Path, cache_dir: Path):  # noqa: ANN201
    return load(None, TINY + [f"data.dir={synth_dir}", "model.text_encoder=wordllama", "data.cold_items=0.25",
                              "pretrain.epochs=40", "pretrain.lr=0.01"])


def test_text_backbone_scores_items_it_never_trained_on(cold_cfg, cache_dir: Path) -> None:  # noqa: ANN001
    """Synthetic items of one community share a genre in their text. After pre-training with a
    quarter of the items cold, a user's cold items of their own community outscore the other
    cold items: knowledge that reached them through text alone."""
    data = load_dataset("synthetic", cold_cfg.data.dir, 0.2, 0, cold_items=0.25)
    backbone = ensure_backbone(data, cold_cfg)
    warm = np.setdiff1d(np.arange(1, data.n_items + 1), data.cold_items)
    mean = backbone.item_emb.weight[torch.from_numpy(warm)].mean(0)
    for item in data.cold_items:
        torch.testing.assert_close(backbone.item_emb.weight[int(item)], mean)
    genre = np.asarray([t.split(". ")[-1] for t in data.texts])
    cold = torch.from_numpy(data.cold_items)
    margins = []
    with torch.no_grad():
        for u in data.public_users:
            seq = torch.from_numpy(data.train[u][-cold_cfg.model.max_len:]).unsqueeze(0)
            scores = backbone(seq, cold.unsqueeze(0))[0].numpy()
            own = genre[data.cold_items] == genre[data.test_item[u]]
            if own.any() and (~own).any():
                margins.append(scores[own].mean() - scores[~own].mean())
    assert len(margins) >= 5 and np.mean(margins) > 0.5


def test_cold_rows_in_evaluation(cold_cfg, cache_dir: Path) -> None:  # noqa: ANN001
    data = load_dataset("synthetic", cold_cfg.data.dir, 0.2, 0, cold_items=0.25)
    backbone = ensure_backbone(data, cold_cfg)
    nodes = [np.asarray([u]) for u in data.federated_users]
    es = build_eval_set(data, nodes, cold_cfg.model.max_len, 20, 0)
    params = {n: p.detach() for n, p in backbone.named_parameters()}
    result = evaluate(backbone, params, es)
    expected = int(np.isin(data.test_item[data.federated_users], data.cold_items).sum())
    assert expected > 0
    assert set(result["test"][COLD]) == {"sampled", "full"}
    assert result["test"][COLD]["sampled"]["users"] == expected


def test_backbone_serves_another_catalogue_through_text(tmp_path: Path, synth_dir: Path, text_cfg,  # noqa: ANN001
                                                        cache_dir: Path) -> None:
    """A backbone pre-trained on one catalogue serves another: matching titles reuse id rows,
    the rest get the mean of those and are told apart by text; the transformer and projection
    are unchanged."""
    corpus = load_dataset("synthetic", str(synth_dir), 1.0, 0)
    out, _ = save_pretrained(corpus, np.arange(corpus.n_users), text_cfg, tmp_path / "bb")
    source = load_backbone(out)
    renamed = [t if i % 2 else f"Another film {i} (2001)" for i, t in enumerate(corpus.titles)]
    target_data = replace(load_dataset("synthetic", str(synth_dir), 0.0, 0), item_ids=corpus.item_ids + 5000,
                          titles=renamed, texts=[f"{t}. Drama." for t in renamed])
    target = load_backbone(out, target_data)
    mean = source.item_emb.weight[1::2].mean(0)
    for i in range(1, corpus.n_items + 1):
        expected = source.item_emb.weight[i] if i % 2 else mean
        torch.testing.assert_close(target.item_emb.weight[i], expected)
    torch.testing.assert_close(target.item_proj.weight, source.item_proj.weight)
    torch.testing.assert_close(target.item_text, torch.from_numpy(
        np.vstack([np.zeros((1, 256), np.float32), embed_texts(target_data.texts, "wordllama")[1:]])))
    with torch.no_grad():
        scores = target(torch.tensor([[2, 4, 6]]), torch.tensor([[2, 3, 4]]))
    assert torch.isfinite(scores).all() and scores[0, 0] != scores[0, 2]


def test_a_backbone_that_saw_the_nodes_is_refused(tmp_path: Path, synth_dir: Path, tiny_cfg,  # noqa: ANN001
                                                  cache_dir: Path) -> None:
    corpus = load_dataset("synthetic", str(synth_dir), 1.0, 0)
    out, _ = save_pretrained(corpus, np.arange(corpus.n_users), replace(tiny_cfg, pretrain=replace(
        tiny_cfg.pretrain, corpus="synthetic")), tmp_path / "bb")
    with pytest.raises(BackboneError, match="seen the federated users"):
        load_backbone(out, load_dataset("synthetic", str(synth_dir), 0.0, 0))


def test_text_encoder_needs_item_metadata(tmp_path: Path, synth_dir: Path, text_cfg, cache_dir: Path) -> None:  # noqa: ANN001
    (tmp_path / "u.data").write_bytes((synth_dir / "u.data").read_bytes())
    bare = load_dataset("synthetic", str(tmp_path), 0.2, 0)
    assert bare.texts == []
    with pytest.raises(ValueError, match="ships no item metadata"):
        fresh_backbone(bare, text_cfg)
