"""Two peft LoRA adapters on one frozen backbone, ``personal`` and ``shared``, mixed by a gate.

Why this shape (docs/design.md, section 3, after FedPA): the personal adapter fits the user and never
leaves the device; the shared adapter is the only thing gossiped; a learned per-layer gate
decides how much each contributes. Both adapters are active in one forward pass
(``base_model.set_adapter([...])``); trainability is set explicitly afterwards because
peft's ``set_adapter`` silently freezes adapters that are not named.

The gate is applied by forward hooks on each adapter's ``lora_B`` output inside encoder
layer ``l``: personal is scaled by ``2*sigmoid(g_l)``, shared by ``2*(1-sigmoid(g_l))``,
so at ``g = 0`` both count fully. The hooks read :attr:`DualAdapterModel.gate` at call
time, so ``torch.func.functional_call`` with substituted parameters gates correctly.
LoRA on the item embedding has no per-layer gate (it is not inside a layer) and the two
adapters simply add there.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from p2prec.model.backbone import SeqRecModel

# peft 0.21 still calls a transformers helper that transformers 5 deprecates; harmless noise.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

PERSONAL = "personal"
SHARED = "shared"
ADAPTERS = (PERSONAL, SHARED)
_LAYER = re.compile(r"\.layer\.(\d+)\.")


def gated_layer(module_name: str) -> int | None:
    """The encoder layer whose gate scales a LoRA module of this name; None outside the layers."""
    match = _LAYER.search(module_name)
    return None if match is None else int(match.group(1))


def gate_factor(gate: torch.Tensor, adapter: str) -> torch.Tensor:
    """Scale of ``adapter``'s LoRA output for gate logits ``gate`` (any shape, elementwise).

    The hooks here and the simulator's hand-batched forward both call this, so the gate is
    written once.
    """
    weight = torch.sigmoid(gate)
    return 2.0 * (weight if adapter == PERSONAL else 1.0 - weight)


class DualAdapterModel(nn.Module):
    """A peft-wrapped backbone with both adapters active and a per-layer gate.

    Invariants: backbone parameters have ``requires_grad=False``; exactly the LoRA
    parameters of both adapters and :attr:`gate` are trainable.
    """

    def __init__(self, backbone: SeqRecModel, rank_personal: int = 8, rank_shared: int = 8,
                 alpha_personal: float = 8.0, alpha_shared: float = 8.0,
                 targets_personal: Iterable[str] = ("query", "value", "item_emb"),
                 targets_shared: Iterable[str] = ("query", "value", "item_emb"),
                 dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        specs = {
            PERSONAL: LoraConfig(r=rank_personal, lora_alpha=alpha_personal, lora_dropout=dropout,
                                 target_modules=list(targets_personal), bias="none"),
            SHARED: LoraConfig(r=rank_shared, lora_alpha=alpha_shared, lora_dropout=dropout,
                               target_modules=list(targets_shared), bias="none"),
        }
        self.peft = get_peft_model(backbone, specs[PERSONAL], adapter_name=PERSONAL)
        self.peft.add_adapter(SHARED, specs[SHARED])
        self.peft.base_model.set_adapter(list(ADAPTERS))
        self.gate = nn.Parameter(torch.zeros(backbone.config.layers))
        for name, param in self.peft.named_parameters():
            param.requires_grad_(".lora_" in name)
        self._install_gate_hooks()

    @property
    def backbone(self) -> SeqRecModel:
        return self.peft.base_model.model

    def _install_gate_hooks(self) -> None:
        for name, module in self.peft.named_modules():
            layer = gated_layer(name)
            if layer is None or not name.endswith(tuple(f"lora_B.{a}" for a in ADAPTERS)):
                continue
            module.register_forward_hook(self._gate_hook(layer, name.rsplit(".", 1)[-1]))

    def _gate_hook(self, layer: int, adapter: str):  # noqa: ANN202 - a torch hook closure
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output * gate_factor(self.gate[layer], adapter)
        return hook

    def forward(self, items: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Scores from the adapted backbone; see :meth:`SeqRecModel.forward` for shapes."""
        return self.peft(items, candidates)

    # --- parameter groups, keyed by this module's own parameter names ------------------

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def shared_names(self) -> list[str]:
        """Names of the gossiped tensors: the shared adapter's LoRA factors, nothing else."""
        return [n for n in self.trainable_names() if n.endswith(f".{SHARED}") or f".{SHARED}." in n]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The shared adapter as a flat ``name -> tensor`` dict (copies, safe to send)."""
        params = dict(self.named_parameters())
        return {n: params[n].detach().clone() for n in self.shared_names()}

    def load_shared_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the shared adapter; names and shapes must match exactly."""
        self.load_trainable(state, names=self.shared_names())

    def load_trainable(self, state: dict[str, torch.Tensor], names: list[str] | None = None) -> None:
        expected = set(names if names is not None else self.trainable_names())
        if set(state) != expected:
            missing = sorted(expected - set(state))[:3]
            extra = sorted(set(state) - expected)[:3]
            raise ValueError(f"adapter state does not match: missing {missing}, unexpected {extra}")
        params = dict(self.named_parameters())
        for name, value in state.items():
            if tuple(value.shape) != tuple(params[name].shape):
                raise ValueError(f"adapter tensor {name}: shape {tuple(value.shape)}, "
                                 f"expected {tuple(params[name].shape)}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def parameter_counts(self) -> dict[str, int]:
        """Counts of backbone, personal, shared and gate parameters."""
        params = dict(self.named_parameters())
        shared = set(self.shared_names())
        personal = [n for n in self.trainable_names() if n not in shared and n != "gate"]
        return {
            "backbone": sum(p.numel() for n, p in params.items() if not p.requires_grad),
            "personal": sum(params[n].numel() for n in personal),
            "shared": sum(params[n].numel() for n in shared),
            "gate": self.gate.numel(),
        }
