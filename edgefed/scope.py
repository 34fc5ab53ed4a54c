"""A client's scope: the global tensors it runs on, and the ones it trains and sends under its plan.

A plan (edgefed/devices/planner.py) becomes, for every communicated tensor:

- received: the tensor belongs to the embeddings, the head, or a layer below the plan's exit;
- sent: received, and not in a frozen layer (the embeddings train only when no layer is frozen);
- its sent shape: the whole tensor, or for a low-rank factor pair the leading `rank` components
  (A[:rank, :], B[:, :rank]) when the plan's rank is below the run's.

Heterogeneous updates follow one convention: a client's tensor is always the leading block of the
global one, so the `hetero` aggregator can average every element over the clients that hold it.
Components beyond a client's rank stay exactly at their global values on the client: their
gradients are zeroed before each optimizer step (AdamW then leaves them unchanged), and every client
computes with the same scale α/r of the run's rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from edgefed.methods.base import LowRankPair

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layer|adapters|exits)\.(\d+)\.")
EMBEDDINGS = -1


def layer_of(name: str) -> int | None:
    """The encoder layer a parameter belongs to, EMBEDDINGS, or None for the head."""
    if name.startswith("embeddings.") or ".embeddings." in name:
        return EMBEDDINGS
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


Shape = tuple[int, ...]


@dataclass(frozen=True)
class Scope:
    received: tuple[str, ...]
    sent: dict[str, Shape]  # name -> the leading block the client trains and sends

    @classmethod
    def everything(cls, shapes: dict[str, Shape]) -> Scope:
        return cls(tuple(shapes), dict(shapes))

    def is_full(self, shapes: dict[str, Shape]) -> bool:
        return self.sent == shapes and set(self.received) == set(shapes)


def client_scope(
    shapes: dict[str, Shape],
    pairs: list[LowRankPair],
    frozen_layers: int,
    exit_layer: int,
    rank: int,
) -> Scope:
    """The scope of a plan over a global state with these tensor shapes."""
    a_keys = {pair.a for pair in pairs}
    b_keys = {pair.b for pair in pairs}
    received, sent = [], {}
    for name, shape in shapes.items():
        layer = layer_of(name)
        if layer is not None and layer >= exit_layer:
            continue
        received.append(name)
        trains = layer is None or layer >= frozen_layers or (layer == EMBEDDINGS and frozen_layers == 0)
        if not trains:
            continue
        if name in a_keys and rank < shape[0]:
            shape = (rank, *shape[1:])
        elif name in b_keys and rank < shape[1]:
            shape = (shape[0], rank)
        sent[name] = tuple(shape)
    return Scope(tuple(received), sent)


def leading_block(tensor: torch.Tensor, shape: Shape) -> torch.Tensor:
    return tensor[tuple(slice(0, size) for size in shape)]


def block_mask(full: Shape, block: Shape, device: torch.device) -> torch.Tensor | None:
    """1 inside the leading block, 0 outside; None when the block is the whole tensor."""
    if tuple(full) == tuple(block):
        return None
    mask = torch.zeros(full, device=device)
    leading_block(mask, block).fill_(1.0)
    return mask
