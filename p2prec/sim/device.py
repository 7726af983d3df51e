"""Which torch device the local simulator's tensors live on (``sim.device``, ``--device``).

Why a seam of its own: the default must follow the machine (CUDA when torch sees one, else
the CPU), and asking for CUDA where there is none must be one clear line at start-up, not a
stack trace from the first tensor moved.
"""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu`` or ``cuda`` as a device; ``cuda`` without one is a ``ValueError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("sim.device = 'cuda': torch sees no CUDA device here; use --device cpu (or auto)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"sim.device: {name!r} is not one of auto, cpu, cuda")
    return torch.device(name)
