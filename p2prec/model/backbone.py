"""The frozen sequential recommender: item vectors feeding a ``transformers`` BERT encoder.

An item's vector is the sum of two paths, either of which may be absent:

- **text**: the item's text embedding from a pre-trained language model (a frozen buffer,
  :mod:`p2prec.model.text`) through a learned projection :attr:`SeqRecModel.item_proj`.
  It gives every item with a text a vector, including items never seen in training and
  the items of another catalogue; this is what makes the backbone a foundation model that
  transfers.
- **id**: a learned id embedding :attr:`SeqRecModel.item_emb`, which memorises what text
  cannot say. Items without a learned row (cold, or unmatched in another catalogue) keep
  a zero row and are known by their text alone.

Why call the encoder's parts instead of ``BertModel.forward``: the model builds its own 4D
additive float mask (causal plus padding). That mask is what ``torch.func.vmap`` needs
to batch many nodes' forwards at once, and it skips the library's mask helpers whose
data-dependent shortcuts break under ``vmap``. Sequences are left-padded with item 0, so
the last position always holds the most recent item and its state scores the next item.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel, PretrainedConfig, PreTrainedModel

#: Additive mask value for blocked attention; finite so fully padded rows stay NaN-free.
MASK_VALUE = -1e9


class SeqRecConfig(PretrainedConfig):
    """Backbone hyper-parameters, saved as ``config.json`` beside the weights."""

    model_type = "p2prec-seqrec"

    def __init__(self, n_items: int = 1, hidden: int = 64, layers: int = 2, heads: int = 2,
                 intermediate: int = 256, max_len: int = 50, dropout: float = 0.2,
                 causal: bool = True, text_dim: int = 0, text_encoder: str = "none",
                 id_embedding: bool = True, **kwargs: object) -> None:
        self.n_items = n_items
        self.text_dim = text_dim
        self.text_encoder = text_encoder
        self.id_embedding = id_embedding or text_dim == 0
        self.hidden = hidden
        self.layers = layers
        self.heads = heads
        self.intermediate = intermediate
        self.max_len = max_len
        self.dropout = dropout
        self.causal = causal
        super().__init__(**kwargs)

    def bert_config(self) -> BertConfig:
        return BertConfig(
            vocab_size=2,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate,
            max_position_embeddings=self.max_len,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            type_vocab_size=1,
            attn_implementation="eager",
        )


class SeqRecModel(PreTrainedModel):
    """Maps a left-padded item sequence ``[B, L]`` to user states ``[B, L, hidden]``.

    Candidates are scored through :meth:`item_vectors`, which calls :attr:`item_emb` and
    :attr:`item_proj` (never reading their ``.weight``), so LoRA adapters on either also
    change the output side. :attr:`item_text` is not saved with the weights: it belongs to
    a catalogue, and :func:`p2prec.model.store.load_backbone` fills it for the catalogue
    being served.
    """

    config_class = SeqRecConfig
    base_model_prefix = "seqrec"

    def __init__(self, config: SeqRecConfig) -> None:
        super().__init__(config)
        self.item_emb = (nn.Embedding(config.n_items + 1, config.hidden, padding_idx=0)
                         if config.id_embedding else None)
        self.item_proj = nn.Linear(config.text_dim, config.hidden, bias=False) if config.text_dim else None
        self.register_buffer("item_text", torch.zeros(config.n_items + 1, config.text_dim), persistent=False)
        self.encoder = BertModel(config.bert_config(), add_pooling_layer=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Embedding) and module is getattr(self, "item_emb", None):
            nn.init.normal_(module.weight, std=0.02)
            with torch.no_grad():
                module.weight[0].zero_()
        elif module is getattr(self, "item_proj", None):
            nn.init.normal_(module.weight, std=0.02)
        else:
            self.encoder._init_weights(module)

    def attention_mask(self, items: torch.Tensor) -> torch.Tensor:
        """Additive float mask ``[B, 1, L, L]``: padding keys blocked, future keys blocked if causal."""
        length = items.shape[-1]
        allowed = (items != 0).unsqueeze(-2).expand(*items.shape[:-1], length, length)
        if self.config.causal:
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
        mask = torch.zeros(allowed.shape, dtype=self.item_text.dtype, device=items.device)
        return mask.masked_fill(~allowed, MASK_VALUE).unsqueeze(-3)

    def set_item_text(self, embeddings: torch.Tensor) -> None:
        """Install a catalogue's text embeddings ``[n_items + 1, text_dim]`` (row 0: padding, zero)."""
        if tuple(embeddings.shape) != tuple(self.item_text.shape):
            raise ValueError(f"item text embeddings have shape {tuple(embeddings.shape)}, "
                             f"expected {tuple(self.item_text.shape)}")
        self.item_text.copy_(embeddings)
        self.item_text[0].zero_()

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Vectors ``[..., hidden]`` of item indices ``ids``: id path plus projected text path.

        When ``ids`` name at least as many items as the catalogue holds (a training batch's
        candidates, the full protocol), the catalogue is projected once and rows gathered;
        otherwise only the named items' texts are projected. Both give the same rows.
        """
        out = self.item_emb(ids) if self.item_emb is not None else None
        if self.item_proj is not None:
            if ids.numel() >= self.item_text.shape[0]:
                text = self.item_proj(self.item_text)[ids]
            else:
                text = self.item_proj(self.item_text[ids])
            out = text if out is None else out + text
        return out

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """User states ``[B, L, hidden]`` for left-padded sequences ``[B, L]``."""
        embeds = self.item_vectors(items)
        hidden = self.encoder.embeddings(inputs_embeds=embeds)
        return self.encoder.encoder(hidden, attention_mask=self.attention_mask(items)).last_hidden_state

    def forward(self, items: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Score ``candidates`` for the sequences ``items`` ``[B, L]``.

        ``candidates`` ``[B, C]`` are scored from the last position (evaluation);
        ``[B, L, C]`` at every position (training). Scoring lives in ``forward`` so that
        one ``functional_call`` covers the whole computation.
        """
        states = self.encode(items)
        if candidates.dim() == 2:
            states = states[:, -1]
        return score(states, self.item_vectors(candidates))


def score(states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Dot products of user states ``[..., hidden]`` with candidate embeddings ``[..., C, hidden]``."""
    return (states.unsqueeze(-2) * candidates).sum(-1)


def build_backbone(n_items: int, hidden: int = 64, layers: int = 2, heads: int = 2,
                   intermediate: int = 256, max_len: int = 50, dropout: float = 0.2,
                   causal: bool = True, seed: int = 0, text: torch.Tensor | None = None,
                   text_encoder: str = "none", id_embedding: bool = True) -> SeqRecModel:
    """A freshly initialised backbone, deterministic in ``seed``; ``text`` ``[n_items + 1, d]``
    (from ``text_encoder``) switches the text path on."""
    torch.manual_seed(seed)
    model = SeqRecModel(SeqRecConfig(n_items=n_items, hidden=hidden, layers=layers, heads=heads,
                                     intermediate=intermediate, max_len=max_len, dropout=dropout,
                                     causal=causal, text_dim=0 if text is None else int(text.shape[1]),
                                     text_encoder=text_encoder, id_embedding=id_embedding))
    if text is not None:
        model.set_item_text(text)
    return model
