"""The adapter model's forward, loss and gradients for a chunk of nodes at once, written by hand.

Why by hand: the simulator trains hundreds of nodes whose local step is one user's
sequence, so per-node Python overhead, not arithmetic, bounds a per-node loop, and
``torch.func.vmap`` over the peft model was measured no faster on CPU. Here the frozen
backbone runs once over every token of every node (``[N*B*L, d]`` GEMMs, one attention,
one set of LayerNorms), and only the LoRA terms are per node: a ``bmm`` with that node's
``A`` and ``B`` (a gather of ``A``'s columns for the item embedding). The math follows the
wrapped model exactly (peft's LoRA, the per-layer gate of :mod:`p2prec.model.adapters`,
BERT's eager attention), so with dropout off its scores and gradients equal
``functional_call`` of the model per node; the tests hold it to that.

What it reads from the model rather than assumes: which modules carry which adapter, each
adapter's scaling and LoRA dropout, every backbone weight, LayerNorm and activation (the
modules are called in place, never copied), and each dropout's rate and train/eval mode.
LoRA placed on a module this forward does not route through is refused at construction
instead of being silently ignored.

Measured at all 754 federated ML-100K nodes (one sequence of 50 per node, 1 thread):
1.08 s per round against 1.57 s for ``vmap`` of ``functional_call`` and 7.1 s for the
per-node loop; chunks of 32 to 256 nodes ran equally fast (``benchmarks/bench_sim.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from peft.tuners.lora import Embedding as LoraEmbedding
from peft.tuners.lora import LoraLayer
from torch import nn

from p2prec.learn.local import Params, ranking_loss
from p2prec.model.adapters import DualAdapterModel, gate_factor, gated_layer
from p2prec.model.backbone import score

GATE = "gate"


@dataclass(frozen=True)
class _Lora:
    """One adapter on one module: its stacked parameter names and how its output is scaled."""

    adapter: str
    a: str
    b: str
    scaling: float
    dropout: nn.Module
    layer: int | None


class BatchedAdapterModel:
    """:class:`DualAdapterModel` evaluated with per-node adapters stacked ``[N, ...]``.

    ``params`` are keyed by ``model.trainable_names()``; ``params[name][i]`` is node i's tensor.
    Dropout follows the model's train/eval mode; in train mode each call draws its own masks.
    """

    def __init__(self, model: DualAdapterModel) -> None:
        self.backbone = model.backbone
        self._terms = _lora_terms(model)
        self._padding = {t.a: module.get_base_layer().padding_idx for module, ts in self._terms.items()
                         if isinstance(module, LoraEmbedding) for t in ts}
        routed = {self.backbone.item_emb, self.backbone.item_proj}
        for layer in self.backbone.encoder.encoder.layer:
            att = layer.attention.self
            routed |= {att.query, att.key, att.value, layer.attention.output.dense, layer.intermediate.dense,
                       layer.output.dense}
        stray = [name for name, module in model.named_modules() if module in self._terms and module not in routed]
        if stray:
            raise ValueError(f"batched forward: LoRA on {stray} is not supported")

    def scores(self, params: Params, inputs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Scores ``[N, B, L, C]`` of ``candidates`` ``[N, B, L, C]`` after sequences ``inputs`` ``[N, B, L]``.

        The same as :meth:`SeqRecModel.forward` at every position, node by node.
        """
        n, b, length = inputs.shape
        c = candidates.shape[-1]
        embedded = self._embed(params, torch.cat([inputs.reshape(n, -1), candidates.reshape(n, -1)], dim=1))
        d = embedded.shape[-1]
        tokens, cands = embedded.split([b * length, b * length * c], dim=1)
        hidden = self._positions(tokens.reshape(n * b, length, d))
        mask = self.backbone.attention_mask(inputs.reshape(n * b, length))
        for layer in self.backbone.encoder.encoder.layer:
            hidden = self._layer(params, layer, hidden, mask, n)
        return score(hidden.reshape(n, b, length, d), cands.reshape(n, b, length, c, d))

    def loss_and_grads(self, params: Params, inputs: torch.Tensor, targets: torch.Tensor,
                       negatives: torch.Tensor, kind: str) -> tuple[Params, torch.Tensor]:
        """Each node's gradient of its own mean loss, and the losses ``[N]``.

        Autograd runs once on the sum of the nodes' losses: node i's tensors reach only node
        i's loss, so the gradient of the sum is every node's own gradient.
        """
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():
            scores = self.scores(leaves, inputs, torch.cat([targets.unsqueeze(-1), negatives], dim=-1))
            mask = (targets != 0).to(scores.dtype)
            losses = torch.vmap(partial(ranking_loss, kind=kind))(scores[..., 0], scores[..., 1:], mask)
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()), materialize_grads=True)
        out = dict(zip(leaves, grads))
        for name, pad in self._padding.items():
            if pad is not None:
                out[name][:, :, pad] = 0.0
        return out, losses.detach()

    def _embed(self, params: Params, ids: torch.Tensor) -> torch.Tensor:
        """Item vectors ``[N, T, d]`` of ``ids`` ``[N, T]``: the id path and the text path, each
        node with its own LoRA on either, as :meth:`SeqRecModel.item_vectors` computes them."""
        out = self._id_path(params, ids) if self.backbone.item_emb is not None else None
        if self.backbone.item_proj is not None:
            text = self._text_path(params, ids)
            out = text if out is None else out + text
        return out

    def _id_path(self, params: Params, ids: torch.Tensor) -> torch.Tensor:
        """The id embedding of ``ids`` ``[N, T]`` with each node's embedding LoRA.

        peft embeds through ``A``'s transposed table with the base layer's ``padding_idx``,
        which leaves the padding row's forward value but gives it no gradient;
        :meth:`loss_and_grads` zeroes that column of the gradient to match. Like peft, no
        LoRA dropout and no gate apply to the embedding.
        """
        module = self.backbone.item_emb
        terms = self._terms.get(module, ())
        out = (module.get_base_layer() if terms else module)(ids)
        for t in terms:
            a = params[t.a]
            rows = torch.gather(a, 2, ids.unsqueeze(1).expand(-1, a.shape[1], -1))
            out = torch.baddbmm(out, rows.mT, params[t.b].mT, alpha=t.scaling)
        return out

    def _text_path(self, params: Params, ids: torch.Tensor) -> torch.Tensor:
        """The projected text of ``ids`` ``[N, T]`` with each node's LoRA on the projection.

        Why by catalogue rather than by token: a node's tokens and candidates name about as
        many items as the catalogue holds, each with a 256-d text. So the frozen projection is
        applied once to the whole catalogue, and each node's ``A`` once to the catalogue's
        texts (``[N, V, r]``), and rows are gathered from those. This is the same sum as
        peft's ``B(A(text))`` per token, without a ``[N, T, 256]`` copy of the texts; only
        LoRA dropout, which draws a mask per token, needs the per-token form.
        """
        module = self.backbone.item_proj
        terms = self._terms.get(module, ())
        text = self.backbone.item_text
        out = (module.get_base_layer() if terms else module)(text)[ids]
        for t in terms:
            if t.dropout.training and getattr(t.dropout, "p", 0.0) > 0.0:
                low = torch.bmm(dropout(t.dropout, text[ids]), params[t.a].mT)
            else:
                low = torch.gather(torch.matmul(text, params[t.a].mT), 1,
                                   ids.unsqueeze(-1).expand(-1, -1, params[t.a].shape[1]))
            out = torch.baddbmm(out, low, params[t.b].mT, alpha=t.scaling)
        return out

    def _positions(self, embeds: torch.Tensor) -> torch.Tensor:
        """BERT's embedding layer on ``inputs_embeds`` ``[M, L, d]``: token-type and position
        embeddings from its own buffers, its LayerNorm, then dropout."""
        e = self.backbone.encoder.embeddings
        length = embeds.shape[1]
        summed = embeds + e.token_type_embeddings(e.token_type_ids[:, :length])
        summed = summed + e.position_embeddings(e.position_ids[:, :length])
        return dropout(e.dropout, e.LayerNorm(summed))

    def _linear(self, params: Params, module: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
        """``module(x)`` for ``x`` ``[N*B, L, d_in]``: the base layer on all tokens, then each node's LoRA."""
        terms = self._terms.get(module, ())
        out = (module.get_base_layer() if terms else module)(x)
        if not terms:
            return out
        per_node = out.view(n, -1, out.shape[-1])
        for t in terms:
            scale = (t.scaling if t.layer is None
                     else t.scaling * gate_factor(params[GATE][:, t.layer], t.adapter).view(n, 1, 1))
            low = torch.bmm(dropout(t.dropout, x).view(n, -1, x.shape[-1]), params[t.a].mT)
            per_node = torch.baddbmm(per_node, low, (params[t.b] * scale).mT)
        return per_node.view_as(out)

    def _layer(self, params: Params, layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor,
               n: int) -> torch.Tensor:
        """One BERT layer (eager attention, post-LayerNorm) over ``hidden`` ``[N*B, L, d]``."""
        att = layer.attention.self
        heads = (*hidden.shape[:-1], att.num_attention_heads, att.attention_head_size)
        q, k, v = (self._linear(params, m, hidden, n).view(heads).transpose(1, 2)
                   for m in (att.query, att.key, att.value))
        weights = dropout(att.dropout, torch.softmax(torch.matmul(q, k.transpose(2, 3)) * att.scaling + mask, dim=-1))
        context = torch.matmul(weights, v).transpose(1, 2).reshape(hidden.shape)
        out = layer.attention.output
        attended = out.LayerNorm(dropout(out.dropout, self._linear(params, out.dense, context, n)) + hidden)
        inner = layer.intermediate.intermediate_act_fn(self._linear(params, layer.intermediate.dense, attended, n))
        ffn = layer.output
        return ffn.LayerNorm(dropout(ffn.dropout, self._linear(params, ffn.dense, inner, n)) + attended)


def dropout(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the dropout ``module`` (``nn.Dropout`` or ``nn.Identity``) does to ``x`` in its current mode.

    Why not call it: on CPU its Bernoulli draw costs about 30 ns per element, more than
    the rest of the layer. Here the keep mask compares 16-bit slices of 64-bit random
    integers with a threshold (about 5 ns per element), so the drop rate is ``p`` rounded
    to a multiple of 2**-16, and survivors are scaled by the inverse of that rounded keep
    rate, which keeps the expectation exact. Masks come from torch's global generator.
    """
    p = getattr(module, "p", 0.0)
    if not module.training or p == 0.0:
        return x
    keep = round((1.0 - p) * 65536)
    if keep == 0:
        return x * 0.0
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    lanes = bits.view(torch.int16)[:x.numel()].view(x.shape)
    return x * (lanes < keep - 32768).to(x.dtype).mul_(65536 / keep)


def _lora_terms(model: DualAdapterModel) -> dict[nn.Module, list[_Lora]]:
    """Every active LoRA adapter of the peft model, by the module it wraps.

    Only plain LoRA is supported (no DoRA or other variants, no LoRA bias, no transposed
    weights); anything else is refused rather than computed differently from peft.
    """
    names = set(model.trainable_names())
    terms: dict[nn.Module, list[_Lora]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        embedding = isinstance(module, LoraEmbedding)
        for adapter in module.active_adapters:
            if embedding and adapter in module.lora_embedding_A:
                a, b = f"{name}.lora_embedding_A.{adapter}", f"{name}.lora_embedding_B.{adapter}"
            elif not embedding and adapter in module.lora_A:
                a, b = f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"
                if module.lora_B[adapter].bias is not None or getattr(module, "fan_in_fan_out", False):
                    raise ValueError(f"batched forward: {name} has a LoRA bias or transposed weights")
            else:
                continue
            if adapter in module.lora_variant or a not in names or b not in names:
                raise ValueError(f"batched forward: {name}.{adapter} is not a plain trainable LoRA adapter")
            terms.setdefault(module, []).append(_Lora(adapter, a, b, module.scaling[adapter], module.lora_dropout[adapter],
                                                      None if embedding else gated_layer(name)))
    return terms
