"""Test-time augmentation over the dihedral symmetries of a cube's x/y plane.

A synapse's type does not depend on how the section plane is oriented, so averaging a model's logits over rotated
and mirrored copies of a cube removes orientation noise from its prediction without retraining.

Usage::

    logits = predict_tta(model, normalize(cubes), views=8)   # (B,) mean logit over the 8 in-plane views

Cubes are anisotropic (40-nm sections, 8-nm voxels), so z is never swapped with x or y: the in-plane group is the 8
rotations/mirrors of the (Y, X) plane, and ``z_flip`` doubles it to 16 by also reversing the section order.

Non-square cubes (Y != X): a 90-degree rotation would change the shape, so only the four shape-keeping transforms
are used (identity, x flip, y flip, 180-degree rotation), doubled to eight with ``z_flip``. ``views=8`` on such a
cube therefore averages 4 views and ``views=16`` averages 8.
"""

from __future__ import annotations

import torch

VIEW_COUNTS = (1, 8, 16)
_Z, _Y, _X = -3, -2, -1


def dihedral_views(batch: torch.Tensor, z_flip: bool = False) -> list[torch.Tensor]:
    """The transformed copies of ``batch`` (B, 1, Z, Y, X), identity first.

    Square planes: 4 rotations x optional x flip = 8 (16 with ``z_flip``). Non-square planes: 4 (8), see module doc.

    Usage::

        views = dihedral_views(cubes)            # 8 tensors shaped like cubes
    """
    if batch.dim() < 3:
        raise ValueError(f"expected (..., Z, Y, X), got shape {tuple(batch.shape)}")
    if batch.shape[_Y] == batch.shape[_X]:
        rotations = [torch.rot90(batch, k, dims=(_Y, _X)) for k in range(4)]
        plane = rotations + [torch.flip(r, dims=(_X,)) for r in rotations]
    else:
        plane = [batch, torch.flip(batch, dims=(_X,)), torch.flip(batch, dims=(_Y,)), torch.flip(batch, dims=(_Y, _X))]
    if z_flip:
        plane = plane + [torch.flip(v, dims=(_Z,)) for v in plane]
    return plane


@torch.no_grad()
def predict_tta(model: torch.nn.Module, batch: torch.Tensor, *, views: int = 8) -> torch.Tensor:
    """Mean of ``model``'s logits over ``views`` transforms of ``batch``; ``views=1`` is the plain forward pass.

    Logits (not probabilities) are averaged so the result plugs into the same sigmoid/threshold code as plain
    predictions. The model's train/eval mode is left as the caller set it (call ``model.eval()`` first). Views run
    one forward pass each rather than as one concatenated batch, to keep peak memory at one batch.

    Usage::

        model.eval()
        logits = predict_tta(model, normalize(cubes), views=16)
    """
    if views not in VIEW_COUNTS:
        raise ValueError(f"views must be one of {VIEW_COUNTS}, got {views}")
    if views == 1:
        return model(batch)
    transformed = dihedral_views(batch, z_flip=views == 16)
    first = model(transformed[0])
    # Accumulate in float64 so 16 additions do not cost the float32 logits precision.
    total = first.double()
    for view in transformed[1:]:
        total += model(view).double()
    return (total / len(transformed)).to(first.dtype)
