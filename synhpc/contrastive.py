"""The pieces of SimCLR-style contrastive learning on EM cubes: crops that keep the synapse, two augmented views of
every cube, a projection MLP, and the NT-Xent loss (across DDP ranks when there are several).

Every random draw comes from the ``torch.Generator`` passed in (never the global RNG), so a view is a function of
its generator's seed; :func:`view_seed` makes that seed a function of (seed, step, view).

Usage::

    gens = [torch.Generator().manual_seed(view_seed(seed, step, v)) for v in (0, 1)]
    x1, x2 = (contrastive_view(cubes_uint8, cfg.pretrain, augment, g) for g in gens)   # uint8, same shape
    z = net(normalize(torch.cat([x1, x2])))                                            # (2B, P)
    loss, top1 = nt_xent(*z.float().chunk(2), temperature=0.2)

Crops: a box of side ``L = s N`` (s uniform in [crop_min, 1], one s for y and x so the aspect ratio and hence the
shapes of clefts and vesicles keep their proportions) placed so that the cube centre, where the synapse is, lies in
the box's central half; resized back to N with trilinear interpolation. Absolute size is a class cue in EM (a thick
postsynaptic density, 40 nm vesicles), so the zoom stays mild: at most 1 / crop_min.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from synhpc.augment import apply, step_seed
from synhpc.config import AugmentConfig, PretrainConfig


def view_seed(seed: int, step: int, view: int) -> int:
    """The generator seed of one view of one step: distinct for every (step, view), a function of them only."""
    return step_seed(seed, 2 * step + view)


# ------------------------------------------------------------------------------------------------------ crops


def crop_boxes(shape_zyx: tuple[int, int, int], n: int, gen: torch.Generator, crop_min: float, crop_min_z: float = 1.0) -> torch.Tensor:
    """(n, 3, 2) integer boxes ``[start, length]`` per axis (z, y, x) whose central half holds the cube centre.

    The centre voxel of an axis of size N is N // 2 (the cube geometry puts the synapse there); with m = L // 4 the
    start a satisfies a + m <= N // 2 <= a + L - 1 - m and 0 <= a <= N - L.
    """
    z, y, x = shape_zyx
    plane = torch.empty(n).uniform_(crop_min, 1.0, generator=gen)
    depth = torch.empty(n).uniform_(crop_min_z, 1.0, generator=gen)
    out = torch.zeros(n, 3, 2, dtype=torch.long)
    for axis, (size, share) in enumerate(((z, depth), (y, plane), (x, plane))):
        length = (share * size).round().long().clamp(1, size)
        margin = length // 4
        centre = size // 2
        lo = (centre - length + 1 + margin).clamp(min=0)
        hi = torch.minimum(centre - margin, size - length)
        start = lo + (torch.rand(n, generator=gen) * (hi - lo + 1).float()).floor().long().clamp(max=(hi - lo).clamp(min=0))
        out[:, axis, 0], out[:, axis, 1] = start, length
    return out


def resize_crops(batch: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each cube's box resampled (trilinear) to the cube's own shape; float out. A full box gives the cube back.

    One ``affine_grid`` + ``grid_sample`` for the whole batch: output voxel o samples the box at
    ``start + (o + 0.5) L / N - 0.5``, i.e. scale L / N and shift (2 start + L) / N - 1 in normalised coordinates.
    """
    b, _, z, y, x = batch.shape
    sizes = torch.tensor([x, y, z], dtype=torch.float64)
    starts, lengths = boxes[:, [2, 1, 0], 0].double(), boxes[:, [2, 1, 0], 1].double()  # x, y, z order for the grid
    theta = torch.zeros(b, 3, 4, dtype=torch.float64)
    idx = torch.arange(3)
    theta[:, idx, idx] = lengths / sizes
    theta[:, :, 3] = (2 * starts + lengths) / sizes - 1
    grid = F.affine_grid(theta.float().to(batch.device), [b, 1, z, y, x], align_corners=False)
    return F.grid_sample(batch.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def centre_crops(batch: torch.Tensor, gen: torch.Generator, p: float, crop_min: float, crop_min_z: float = 1.0) -> torch.Tensor:
    """A share ``p`` of the cubes cropped around their centre and resized back (:func:`crop_boxes`); dtype kept."""
    chosen = torch.rand(batch.shape[0], generator=gen) < p
    boxes = crop_boxes(tuple(batch.shape[2:]), batch.shape[0], gen, crop_min, crop_min_z)  # drawn for all: fixed stream
    if not chosen.any():
        return batch
    idx = chosen.nonzero().squeeze(1).to(batch.device)
    resized = resize_crops(batch[idx], boxes[chosen])
    if batch.dtype == torch.uint8:
        resized = resized.round_().clamp_(0, 255).to(torch.uint8)
    out = batch.clone()
    out[idx] = resized.to(batch.dtype)
    return out


def contrastive_view(cubes: torch.Tensor, cfg: PretrainConfig, augment: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """One view of a uint8 batch: a centre-keeping crop, then the training augmentations (``augment``), in that
    fixed order from ``gen``. Float out on the uint8 scale (0..255, for ``normalize``): the augmentations' float path
    is vectorised over the batch, where their uint8 path loops over cubes (~15x slower on a CPU)."""
    return apply(centre_crops(cubes.float(), gen, cfg.crop_p, cfg.crop_min, cfg.crop_min_z), augment, gen)


# ------------------------------------------------------------------------------------------------------ networks


class ProjectionHead(nn.Module):
    """SimCLR's projection: Linear, BatchNorm, ReLU, Linear. The loss is computed on its output; the backbone's
    features (its input) are what transfer."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ContrastiveNet(nn.Module):
    """Backbone then projection head; one module, so DDP sees every trained parameter in one forward."""

    def __init__(self, backbone: nn.Module, projector: nn.Module):
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


# ------------------------------------------------------------------------------------------------------ loss


def _gather(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows (gradients flow back to their owners) and the offset of this rank's rows."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z)), dist.get_rank() * z.shape[0]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent (normalised temperature-scaled cross entropy) of paired projections (B, P).

    Each of the 2B views is an anchor whose positive is the other view of its cube and whose negatives are every
    other view of the batch; with DDP (``gather``) the batch is every rank's, so each rank scores its own anchors
    against 2 B W candidates. Returns (mean loss over this rank's anchors, share of anchors whose most similar
    candidate is their positive). With cosine similarities s and temperature t, anchor i's loss is
    ``-log(exp(s_ip / t) / sum_{k != i} exp(s_ik / t))``.
    """
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    n = z1.shape[0]
    (all1, offset), (all2, _) = (_gather(z1), _gather(z2)) if gather else ((z1, 0), (z2, 0))
    total = all1.shape[0]
    anchors = torch.cat([z1, z2])
    logits = anchors @ torch.cat([all1, all2]).T / temperature  # (2n, 2 total)
    own = torch.arange(n, device=z1.device) + offset
    self_idx = torch.cat([own, own + total])
    positive = torch.cat([own + total, own])
    rows = torch.arange(2 * n, device=z1.device)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[rows, self_idx] = True
    logits = logits.masked_fill(mask, float("-inf"))
    loss = F.cross_entropy(logits, positive)
    top1 = (logits.argmax(dim=1) == positive).float().mean()
    return loss, top1.detach()
