"""Top-1 accuracy restricted to a task's classes."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _class_tensor(classes: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(classes, dtype=torch.long, device=device)


def restricted_predictions(
    logits: torch.Tensor, classes: Sequence[int] | torch.Tensor, *, zero_logits: bool = False
) -> torch.Tensor:
    """Predicted model-output index per sample, choosing only among `classes`.

    zero_logits=True reproduces the reference code: the other classes' logits are set to
    0 and the argmax runs over all outputs, so a sample whose chosen logits are all
    negative is predicted as some other class (counted wrong).
    """
    idx = _class_tensor(classes, logits.device)
    if zero_logits:
        masked = torch.zeros_like(logits)
        masked[:, idx] = logits[:, idx]
        return masked.argmax(dim=1)
    return idx[logits.index_select(1, idx).argmax(dim=1)]


def restricted_correct(
    logits: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[int] | torch.Tensor,
    *,
    zero_logits: bool = False,
) -> torch.Tensor:
    """Number of correct predictions as a 0-d tensor on the logits' device (no host sync)."""
    return (restricted_predictions(logits, classes, zero_logits=zero_logits) == labels).sum()


def restricted_accuracy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[int] | torch.Tensor,
    *,
    zero_logits: bool = False,
) -> float:
    """Fraction of samples whose argmax over the task's classes is the label."""
    if logits.ndim != 2 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty batch is undefined")
    correct = restricted_correct(logits, labels, classes, zero_logits=zero_logits)
    return float(correct) / labels.numel()
