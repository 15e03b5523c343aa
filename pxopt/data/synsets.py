"""ImageNet-1k class order: the sorted WNID list that timm ships as package data.

ImageFolder numbers only the folders present, which is wrong for a 1000-class head when
a user keeps a few WNID folders; mapping through this list keeps every index right.
"""

from __future__ import annotations

from functools import cache


@cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WNIDs in model-output order."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo("imagenet-1k").label_names())


@cache
def imagenet_wnid_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_wnids())}


@cache
def imagenet_descriptions() -> tuple[str, ...]:
    """Human-readable names ('tench, Tinca tinca'), index-aligned with `imagenet_wnids()`."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    return tuple(info.index_to_description(i) for i in range(len(imagenet_wnids())))
