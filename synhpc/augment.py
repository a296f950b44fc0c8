"""Batched, seeded augmentations of (B, 1, Z, Y, X) EM cubes, shaped by serial-section EM's own defects.

Every function takes a ``torch.Generator`` and never touches the global RNG, so a resumed run draws what an
uninterrupted one drew. Random parameters are drawn on the CPU generator and moved to the batch's device; the only
bulk random tensor (Gaussian noise) is drawn on the batch's device from a seed taken from ``gen``, which keeps GPU
batches on the GPU. uint8 batches stay uint8 (values rounded and clipped) and float batches stay float.

Usage::

    gen = torch.Generator().manual_seed(step_seed(seed, step))
    cubes = apply(cubes, AugmentParams(), gen)
    cubes, soft = mixup3d(normalize(cubes), targets, alpha=0.4, gen=gen)
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from synhpc.config import AugmentConfig as AugmentParams  # the config section is the parameter set

# ----------------------------------------------------------------------------------------------------------- helpers


def _on(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (drawn on the CPU) on ``like``'s device."""
    return t.to(like.device, non_blocking=True)


def _seed_from(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen))


def _device_generator(gen: torch.Generator, device: torch.device) -> torch.Generator:
    """``gen`` itself on the CPU, else a generator on ``device`` seeded from ``gen`` (deterministic, no host copy)."""
    if device.type == "cpu":
        return gen
    return torch.Generator(device=device).manual_seed(_seed_from(gen))


def _to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint8:
        return x.round_().clamp_(0, 255).to(torch.uint8)
    return x.to(dtype)


def _check(batch: torch.Tensor) -> None:
    if batch.dim() != 5:
        raise ValueError(f"expected a (B, C, Z, Y, X) batch, got shape {tuple(batch.shape)}")


def _chosen_sections(batch: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """(B, Z) bool on the CPU: each section of each cube independently with probability ``p``."""
    return torch.rand((batch.shape[0], batch.shape[2]), generator=gen) < p


# --------------------------------------------------------------------------------------------------------- geometric


def _dihedral(x: torch.Tensor, code: int) -> torch.Tensor:
    """Element ``code`` (0..7) of the in-plane symmetry group: bit 0 flips x, bit 1 flips y, bit 2 swaps y and x."""
    if code & 1:
        x = x.flip(-1)
    if code & 2:
        x = x.flip(-2)
    if code & 4:
        x = x.transpose(-2, -1)
    return x


def flip_rot90(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random x/y flips per cube and, when Y == X, in-plane quarter turns (all 8 in-plane symmetries, uniformly).

    The synapse label does not depend on orientation in the section plane; z is never flipped because section order
    carries the (anisotropic) cutting direction. Cubes sharing a transform are handled in one op, so the cost is at
    most 8 gathers per batch whatever its size.
    """
    _check(batch)
    n_codes = 8 if batch.shape[-1] == batch.shape[-2] else 4  # transposing a non-square section changes its shape
    codes = torch.randint(0, n_codes, (batch.shape[0],), generator=gen)
    out = torch.empty_like(batch)
    for code in codes.unique().tolist():
        idx = _on((codes == code).nonzero().squeeze(1), batch)
        out[idx] = _dihedral(batch[idx], code)
    return out


def _smooth_field(shape: tuple[int, ...], control: tuple[int, ...], size: tuple[int, ...], sigma: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Random displacements at ``control`` points, interpolated (cubic-like, via bicubic/trilinear) to ``size``."""
    coarse = torch.randn((*shape, *control), generator=gen) * sigma
    coarse = _on(coarse, torch.empty(0, device=device))
    mode = "bicubic" if len(size) == 2 else "trilinear"
    return F.interpolate(coarse, size=size, mode=mode, align_corners=True)


def elastic(
    batch: torch.Tensor,
    gen: torch.Generator,
    sigma: float = 2.0,
    spacing: int = 16,
    per_section: bool = True,
    p: float = 1.0,
) -> torch.Tensor:
    """Smooth random warps of amplitude ~``sigma`` voxels with control points every ``spacing`` voxels.

    ``per_section=True`` warps each section independently in-plane (sections are cut and imaged one by one, so their
    distortions are independent); ``False`` warps the cube with one smooth 3D field (z displacement in sections,
    scaled down by 5 since a section is 5 in-plane voxels thick). ``p``: fraction of cubes warped.
    """
    _check(batch)
    b, c, z, y, x = batch.shape
    chosen = torch.rand(b, generator=gen) < p
    if not chosen.any():
        return batch
    idx = chosen.nonzero().squeeze(1)
    k = len(idx)
    sub = batch[_on(idx, batch)].float()
    cy, cx = max(2, round(y / spacing) + 1), max(2, round(x / spacing) + 1)
    # grid_sample works in [-1, 1] coordinates: a displacement of d voxels is 2 d / (n - 1).
    scale = torch.tensor([2.0 / max(x - 1, 1), 2.0 / max(y - 1, 1), 2.0 / max(z - 1, 1)], device=batch.device)
    if per_section:
        field = _smooth_field((k * z, 2), (cy, cx), (y, x), sigma, gen, batch.device)  # (k z, 2, y, x): dx, dy
        gy, gx = torch.meshgrid(torch.linspace(-1, 1, y, device=batch.device), torch.linspace(-1, 1, x, device=batch.device), indexing="ij")
        grid = torch.stack((gx, gy), -1) + field.permute(0, 2, 3, 1) * scale[:2]
        planes = sub.permute(0, 2, 1, 3, 4).reshape(k * z, c, y, x)
        warped = F.grid_sample(planes, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
        warped = warped.reshape(k, z, c, y, x).permute(0, 2, 1, 3, 4)
    else:
        cz = max(2, round(z / max(1, spacing // 5)) + 1)
        field = _smooth_field((k, 3), (cz, cy, cx), (z, y, x), sigma, gen, batch.device)  # (k, 3, z, y, x)
        field[:, 2] /= 5.0
        gz, gy, gx = torch.meshgrid(*(torch.linspace(-1, 1, n, device=batch.device) for n in (z, y, x)), indexing="ij")
        grid = torch.stack((gx, gy, gz), -1) + field.permute(0, 2, 3, 4, 1) * scale
        warped = F.grid_sample(sub, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    out = batch.clone()
    out[_on(idx, batch)] = _to_dtype(warped, batch.dtype)
    return out


# ------------------------------------------------------------------------------------------------ section defects


def section_misalign(
    batch: torch.Tensor,
    gen: torch.Generator,
    p: float = 0.05,
    max_shift: int = 4,
    return_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Shift each section with probability ``p`` by up to ``max_shift`` voxels in y and x (edges replicated).

    Mimics a slipped section in serial-section EM: the one section is displaced, its neighbours are not. The shift
    is never (0, 0). ``return_mask`` also returns the (B, Z) bool mask (CPU) of shifted sections.
    """
    _check(batch)
    mask = _chosen_sections(batch, p, gen)
    bi, zi = mask.nonzero(as_tuple=True)
    k = len(bi)
    out = batch
    if k:
        y, x = batch.shape[-2:]
        shift = torch.randint(-max_shift, max_shift + 1, (k, 2), generator=gen)
        shift[(shift == 0).all(1), 1] = max_shift  # a zero shift would not be an augmentation
        iy = (torch.arange(y)[None] - shift[:, :1]).clamp_(0, y - 1)  # (k, y): source row of each output row
        ix = (torch.arange(x)[None] - shift[:, 1:]).clamp_(0, x - 1)
        bi_d, zi_d, iy, ix = (_on(t, batch) for t in (bi, zi, iy, ix))
        planes = batch[bi_d, :, zi_d]  # (k, C, y, x)
        rows = torch.arange(k, device=batch.device)[:, None, None, None]
        chans = torch.arange(batch.shape[1], device=batch.device)[None, :, None, None]
        out = batch.clone()
        out[bi_d, :, zi_d] = planes[rows, chans, iy[:, None, :, None], ix[:, None, None, :]]
    return (out, mask) if return_mask else out


def missing_sections(
    batch: torch.Tensor,
    gen: torch.Generator,
    p: float = 0.02,
    fill: Literal["zero", "mean", "mixed"] = "mixed",
    return_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Replace each section with probability ``p`` by a flat one: black (``zero``), the cube's mean (``mean``), or
    either at random (``mixed``, as in real data: lost sections read as black, fill-ins as flat grey).

    ``return_mask`` also returns the (B, Z) bool mask (CPU) of replaced sections.
    """
    _check(batch)
    mask = _chosen_sections(batch, p, gen)
    bi, zi = mask.nonzero(as_tuple=True)
    out = batch
    if len(bi):
        black = torch.rand(len(bi), generator=gen) < 0.5 if fill == "mixed" else torch.full((len(bi),), fill == "zero")
        bi_d = _on(bi, batch)
        mean = batch[bi_d].float().mean(dim=(1, 2, 3, 4))  # only the cubes that lose a section
        value = torch.where(_on(black, batch), torch.zeros((), device=batch.device), mean)
        if batch.dtype == torch.uint8:
            value = value.round()
        out = batch.clone()
        out[bi_d, :, _on(zi, batch)] = value.to(batch.dtype)[:, None, None, None]
    return (out, mask) if return_mask else out


# --------------------------------------------------------------------------------------------------------- intensity


def intensity(
    batch: torch.Tensor,
    gen: torch.Generator,
    gamma: float = 0.3,
    contrast: float = 0.2,
    brightness: float = 0.1,
    noise: float = 0.03,
    p: float = 1.0,
    noise_p: float = 1.0,
) -> torch.Tensor:
    """Per-cube gamma (exp(U(-gamma, gamma))), contrast (x (1 +- contrast) about the mean) and brightness
    (+- ``brightness`` of the range) on a fraction ``p`` of cubes; Gaussian noise (std U(0, ``noise``) of the range)
    on an independent fraction ``noise_p``.

    Range: 0..255 for uint8; each cube's own min..max for float, so the result does not depend on how the batch was
    normalised. For uint8, gamma, contrast and brightness are one 256-entry lookup table per cube (cheaper than a
    power per voxel); noise is the costly part (a normal draw per voxel), hence its own probability.
    """
    _check(batch)
    b = batch.shape[0]
    dev = batch.device
    tone = torch.rand(b, generator=gen) < p
    noisy = torch.rand(b, generator=gen) < noise_p
    g = torch.exp((torch.rand(b, generator=gen) * 2 - 1) * gamma)
    cf = 1 + (torch.rand(b, generator=gen) * 2 - 1) * contrast
    br = (torch.rand(b, generator=gen) * 2 - 1) * brightness
    ns = torch.rand(b, generator=gen) * noise
    noisy &= ns > 0
    noise_gen = _device_generator(gen, dev) if noisy.any() else None
    g, cf, br = (_on(v, batch)[:, None] for v in (g, cf, br))
    if batch.dtype == torch.uint8:
        out = batch.clone()
        chosen = tone.nonzero().squeeze(1)
        if len(chosen):
            sub = _on(chosen, batch)
            # Contrast is about the cube's mean brightness after gamma; the mean of u**g is close to mean(u)**g.
            mean = (batch[sub].float().mean(dim=(1, 2, 3, 4)) / 255.0)[:, None]
            levels = torch.linspace(0, 1, 256, device=dev)[None]
            gs, cs, bs = g[sub], cf[sub], br[sub]
            lut = ((levels.pow(gs) - mean.pow(gs)) * cs + mean.pow(gs) + bs) * 255.0  # (k, 256)
            lut = lut.round_().clamp_(0, 255).to(torch.uint8)
            for j, i in enumerate(chosen.tolist()):
                # uint8 indices would be read as a mask; int64 per cube keeps the temporary small.
                out[i] = lut[j][batch[i].long()]
        idx = noisy.nonzero().squeeze(1)
        if len(idx):
            sub = _on(idx, batch)
            scale = _on(ns[idx] * 255.0, batch).view(-1, 1, 1, 1, 1)
            shape = (len(idx), *batch.shape[1:])
            noisy_cubes = torch.randn(shape, generator=noise_gen, device=dev).mul_(scale).add_(out[sub])
            out[sub] = _to_dtype(noisy_cubes, torch.uint8)
        return out
    x = batch.float()
    view = (b, 1, 1, 1, 1)
    lo = x.amin(dim=(1, 2, 3, 4), keepdim=True)
    span = (x.amax(dim=(1, 2, 3, 4), keepdim=True) - lo).clamp_min(1e-6)
    t = _on(tone, batch).view(view)
    g, cf, br = (torch.where(t, v.view(view), torch.full_like(v.view(view), d)) for v, d in ((g, 1.0), (cf, 1.0), (br, 0.0)))
    u = ((x - lo) / span).clamp_(0, 1).pow_(g)
    mean = u.mean(dim=(1, 2, 3, 4), keepdim=True)
    u = (u - mean) * cf + mean + br
    if noise_gen is not None:
        std = _on(torch.where(noisy, ns, torch.zeros_like(ns)), batch).view(view)
        u += torch.randn(u.shape, generator=noise_gen, device=dev) * std
    return (u * span + lo).to(batch.dtype)


# ------------------------------------------------------------------------------------------------------------ mixing


def _beta(alpha: float, n: int, gen: torch.Generator) -> torch.Tensor:
    # torch's Beta sampler takes no generator; numpy's, seeded from ``gen``, keeps the draw reproducible.
    rng = np.random.default_rng(_seed_from(gen))
    return torch.from_numpy(rng.beta(alpha, alpha, size=n).astype(np.float32))


def mixup3d(batch: torch.Tensor, targets: torch.Tensor, alpha: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp: each cube blended with a random partner, weight lam ~ Beta(alpha, alpha) per cube.

    Returns (mixed batch, soft targets lam t_i + (1 - lam) t_j). Mix normalised floats; uint8 input is mixed in
    float and rounded back.
    """
    _check(batch)
    b = batch.shape[0]
    perm = torch.randperm(b, generator=gen)
    lam = _beta(alpha, b, gen)
    lam_d, perm_d = _on(lam, batch), _on(perm, batch)
    w = lam_d.view(b, 1, 1, 1, 1)
    mixed = batch.float() * w + batch[perm_d].float() * (1 - w)
    t = targets.float()
    soft = lam_d.to(t.device) * t + (1 - lam_d.to(t.device)) * t[perm.to(t.device)]
    return _to_dtype(mixed, batch.dtype), soft


def cutmix3d(batch: torch.Tensor, targets: torch.Tensor, alpha: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix in 3D: a box of about (1 - lam) of each cube's volume, lam ~ Beta(alpha, alpha), is pasted from a random
    partner at the same place; targets are weighted by the voxel fractions actually kept.
    """
    _check(batch)
    b, _, z, y, x = batch.shape
    perm = torch.randperm(b, generator=gen)
    lam = _beta(alpha, b, gen)
    side = (1 - lam).clamp(0, 1) ** (1 / 3)  # same fraction per axis gives the volume fraction 1 - lam
    sizes = torch.stack([(side * n).round().long() for n in (z, y, x)], 1)  # (B, 3)
    starts = torch.stack([(torch.rand(b, generator=gen) * (n - sizes[:, i] + 1)).floor().long() for i, n in enumerate((z, y, x))], 1)
    out = batch.clone()
    kept = torch.ones(b)
    for i in range(b):
        (dz, dy, dx), (z0, y0, x0) = sizes[i].tolist(), starts[i].tolist()
        if dz * dy * dx == 0:
            continue
        out[i, :, z0 : z0 + dz, y0 : y0 + dy, x0 : x0 + dx] = batch[int(perm[i]), :, z0 : z0 + dz, y0 : y0 + dy, x0 : x0 + dx]
        kept[i] = 1 - dz * dy * dx / (z * y * x)
    t = targets.float()
    kept = kept.to(t.device)
    return out, kept * t + (1 - kept) * t[perm.to(t.device)]


# ------------------------------------------------------------------------------------------------------- composition


def apply(batch: torch.Tensor, params: AugmentParams, gen: torch.Generator) -> torch.Tensor:
    """Geometric, then section-defect, then intensity augmentations, in that fixed order (so draws are reproducible).

    Mixing needs targets, so it is separate: :func:`mix`.
    """
    if not params.enabled:
        return batch
    if params.flip_rot90:
        batch = flip_rot90(batch, gen)
    if params.elastic_p > 0:
        batch = elastic(batch, gen, params.elastic_sigma, params.elastic_spacing, params.elastic_per_section, params.elastic_p)
    if params.misalign_p > 0:
        batch = section_misalign(batch, gen, params.misalign_p, params.misalign_max_shift)  # type: ignore[assignment]
    if params.missing_p > 0:
        batch = missing_sections(batch, gen, params.missing_p, params.missing_fill)  # type: ignore[assignment]
    if params.intensity_p > 0 or params.noise_p > 0:
        batch = intensity(batch, gen, params.gamma, params.contrast, params.brightness, params.noise, params.intensity_p, params.noise_p)
    return batch


def mix(batch: torch.Tensor, targets: torch.Tensor, params: AugmentParams, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``params.mix`` (mixup / cutmix / none) on a batch; returns (batch, float targets)."""
    if not params.enabled:
        return batch, targets.float()
    if params.mix == "mixup":
        return mixup3d(batch, targets, params.mix_alpha, gen)
    if params.mix == "cutmix":
        return cutmix3d(batch, targets, params.mix_alpha, gen)
    return batch, targets.float()


def bench_augment(n: int = 256, shape: tuple[int, int, int] = (32, 64, 64), params: AugmentParams | None = None, batch_size: int = 32, dtype: torch.dtype = torch.uint8) -> float:
    """Cubes per second through :func:`apply` on one CPU thread (after one warm-up batch).

    Usage: ``bench_augment(256, (32, 64, 64), AugmentParams(elastic_p=1.0))``
    """
    params = params or AugmentParams()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        data = torch.randint(0, 256, (batch_size, 1, *shape), generator=gen, dtype=torch.uint8)
        if dtype != torch.uint8:
            data = data.to(dtype) / 255.0
        apply(data, params, gen)
        done, start = 0, time.perf_counter()
        while done < n:
            apply(data, params, gen)
            done += batch_size
        return done / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def step_seed(seed: int, step: int) -> int:
    """The generator seed of one training step: augmentation draws depend on (seed, step) only, never on history."""
    return (seed * 1_000_003 + step) % (2**63 - 1)
