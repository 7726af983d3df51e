"""The frozen sequential recommender: item embeddings feeding a ``transformers`` BERT encoder.

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
                 causal: bool = True, **kwargs: object) -> None:
        self.n_items = n_items
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

    Candidates are scored by calling :attr:`item_emb` (never by reading its ``.weight``),
    so a LoRA adapter on the embedding also changes the output side.
    """

    config_class = SeqRecConfig
    base_model_prefix = "seqrec"

    def __init__(self, config: SeqRecConfig) -> None:
        super().__init__(config)
        self.item_emb = nn.Embedding(config.n_items + 1, config.hidden, padding_idx=0)
        self.encoder = BertModel(config.bert_config(), add_pooling_layer=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Embedding) and module is getattr(self, "item_emb", None):
            nn.init.normal_(module.weight, std=0.02)
            with torch.no_grad():
                module.weight[0].zero_()
        else:
            self.encoder._init_weights(module)

    def attention_mask(self, items: torch.Tensor) -> torch.Tensor:
        """Additive float mask ``[B, 1, L, L]``: padding keys blocked, future keys blocked if causal."""
        length = items.shape[-1]
        allowed = (items != 0).unsqueeze(-2).expand(*items.shape[:-1], length, length)
        if self.config.causal:
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
        mask = torch.zeros(allowed.shape, dtype=self.item_emb.weight.dtype, device=items.device)
        return mask.masked_fill(~allowed, MASK_VALUE).unsqueeze(-3)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """User states ``[B, L, hidden]`` for left-padded sequences ``[B, L]``."""
        embeds = self.item_emb(items)
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
        return score(states, self.item_emb(candidates))


def score(states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Dot products of user states ``[..., hidden]`` with candidate embeddings ``[..., C, hidden]``."""
    return (states.unsqueeze(-2) * candidates).sum(-1)


def build_backbone(n_items: int, hidden: int = 64, layers: int = 2, heads: int = 2,
                   intermediate: int = 256, max_len: int = 50, dropout: float = 0.2,
                   causal: bool = True, seed: int = 0) -> SeqRecModel:
    """A freshly initialised backbone, deterministic in ``seed``."""
    torch.manual_seed(seed)
    return SeqRecModel(SeqRecConfig(n_items=n_items, hidden=hidden, layers=layers, heads=heads,
                                    intermediate=intermediate, max_len=max_len, dropout=dropout,
                                    causal=causal))
