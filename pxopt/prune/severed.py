"""Recognise prune sets that sever the network: its output no longer depends on the input.

A layer whose every component is pruned outputs exact zeros (weights, bias and its BatchNorm
are zeroed), so whatever follows it is computed from constants. When every path from the
input to the output runs through such a layer (in a ResNet: both the residual branch and the
shortcut of one block), all images get the same logits and one forward pass of a few images
gives the accuracy of the whole set. High rates of a global ranking reach this state often;
the curve then costs nothing there, exactly, instead of full passes that can only confirm it.

The graph is traced with torch.fx at the level of individual layers; a model that cannot be
traced is simply never called severed.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property

import torch
import torch.fx
from torch import nn

from pxopt.prune.prefix import defaults_after_input


class SeveredDetector:
    """`severed(fully_pruned)`: True if the output is input-independent once the layers named
    in `fully_pruned` output zeros. Conservative: unknown structure counts as dependent.

    The model is traced on the first question, so curves that never prune a whole layer
    never pay for the trace.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    @cached_property
    def _nodes(self) -> list[torch.fx.Node] | None:
        try:
            gm = torch.fx.symbolic_trace(self.model, concrete_args=defaults_after_input(self.model))
        except Exception:  # noqa: BLE001 - untraceable: never claim a severed network
            return None
        return list(gm.graph.nodes)

    @property
    def enabled(self) -> bool:
        return self._nodes is not None

    def severed(self, fully_pruned: Iterable[str]) -> bool:
        zero = set(fully_pruned)
        if not zero or self._nodes is None:
            return False
        constant: set[torch.fx.Node] = set()
        for n in self._nodes:
            if n.op == "output":
                return all(a in constant for a in n.all_input_nodes)
            if n.op == "placeholder":
                if n is self._nodes[0]:
                    continue  # the image: the one input that varies
                constant.add(n)  # specialised optional arguments
            elif n.op == "get_attr":
                constant.add(n)
            elif n.op == "call_module" and str(n.target) in zero:
                constant.add(n)
            elif n.all_input_nodes and all(a in constant for a in n.all_input_nodes):
                constant.add(n)
        return False
