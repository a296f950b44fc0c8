"""Seeded, batched cube augmentations: determinism, dtype/shape, and that each does only what it says."""

from __future__ import annotations

import pytest
import torch

from synhpc import augment as A


def _cubes(dtype: torch.dtype = torch.uint8, shape=(6, 1, 8, 16, 16)) -> torch.Tensor:
    x = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(42), dtype=torch.uint8)
    return x if dtype == torch.uint8 else x.to(dtype) / 255.0


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


ALL = {
    "flip_rot90": lambda x, g: A.flip_rot90(x, g),
    "elastic2d": lambda x, g: A.elastic(x, g, sigma=2.0, spacing=8),
    "elastic3d": lambda x, g: A.elastic(x, g, sigma=2.0, spacing=8, per_section=False),
    "misalign": lambda x, g: A.section_misalign(x, g, p=0.3),
    "missing": lambda x, g: A.missing_sections(x, g, p=0.3),
    "intensity": lambda x, g: A.intensity(x, g),
    "apply": lambda x, g: A.apply(x, A.AugmentParams(elastic_p=0.5, noise_p=1.0), g),
}


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_seeded_and_shape_dtype_preserved(name, dtype):
    x = _cubes(dtype)
    a, b, c = ALL[name](x, _gen(1)), ALL[name](x, _gen(1)), ALL[name](x, _gen(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_no_global_rng_use():
    x = _cubes()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    A.apply(x, A.AugmentParams(elastic_p=1.0, noise_p=1.0), _gen())
    A.mixup3d(x, torch.ones(6), 0.4, _gen())
    A.cutmix3d(x, torch.ones(6), 0.4, _gen())
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("shape", [(16, 1, 4, 8, 8), (16, 1, 4, 6, 8)])
def test_flip_rot90_permutes_voxels(shape):
    x = torch.arange(torch.Size(shape).numel()).reshape(shape)  # every voxel unique
    y = A.flip_rot90(x, _gen(3))
    for i in range(shape[0]):
        assert torch.equal(y[i].flatten().sort().values, x[i].flatten().sort().values)
        for z in range(shape[2]):  # sections stay sections: no voxel moves between them
            assert torch.equal(y[i, 0, z].flatten().sort().values, x[i, 0, z].flatten().sort().values)
    seen = {tuple(y[i, 0, 0, 0, :2].tolist()) for i in range(shape[0])}
    assert len(seen) > 1


@pytest.mark.parametrize("fn", ["misalign", "missing"])
def test_section_defects_touch_only_chosen_sections(fn):
    x = _cubes(shape=(8, 1, 10, 12, 12))
    f = A.section_misalign if fn == "misalign" else A.missing_sections
    y, mask = f(x, _gen(5), p=0.2, return_mask=True)
    assert mask.shape == (8, 10) and 0 < mask.sum() < mask.numel()
    changed = (y != x)[:, 0].flatten(2).any(-1)  # (B, Z)
    assert torch.equal(changed, mask)  # random voxels: every chosen section does change


def test_missing_fill_values():
    x = _cubes()
    y, mask = A.missing_sections(x, _gen(0), p=0.5, fill="zero", return_mask=True)
    assert (y[:, 0][mask] == 0).all()
    y, mask = A.missing_sections(x.float(), _gen(0), p=0.5, fill="mean", return_mask=True)
    b = mask.nonzero()[0, 0]
    assert torch.allclose(y[b, 0][mask[b]], x.float()[b].mean())


def test_intensity_identity_when_disabled():
    x = _cubes()
    assert torch.equal(A.intensity(x, _gen(), p=0.0, noise_p=0.0), x)


def test_mixup_soft_targets_are_convex_combinations():
    x = _cubes(torch.float32)
    t = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    mixed, soft = A.mixup3d(x, t, alpha=0.4, gen=_gen(7))
    assert mixed.shape == x.shape and soft.shape == t.shape
    assert ((soft >= 0) & (soft <= 1)).all()
    # Recover each cube's weight from the images and check the targets use the same weights.
    perm = torch.randperm(6, generator=_gen(7))
    for i in range(6):
        j = int(perm[i])
        if i == j:
            assert torch.allclose(mixed[i], x[i]) and soft[i] == t[i]
            continue
        d = (x[i] - x[j]).flatten()
        lam = float(((mixed[i] - x[j]).flatten() @ d) / (d @ d))
        assert torch.allclose(mixed[i], lam * x[i] + (1 - lam) * x[j], atol=1e-5)
        assert soft[i] == pytest.approx(lam * float(t[i]) + (1 - lam) * float(t[j]), abs=1e-4)


def test_cutmix_soft_targets_match_pasted_volume():
    x = torch.zeros(6, 1, 8, 16, 16)
    x[torch.arange(6) % 2 == 1] = 1.0  # positives bright, negatives dark: the pasted fraction is visible
    t = (torch.arange(6) % 2).float()
    mixed, soft = A.cutmix3d(x, t, alpha=1.0, gen=_gen(3))
    assert torch.allclose(soft, mixed.mean(dim=(1, 2, 3, 4)), atol=1e-6)
    assert ((soft >= 0) & (soft <= 1)).all()


def test_device_agnostic_meta_parameters_drawn_on_cpu():
    # Parameters come from the CPU generator; the batch stays where it was (CPU here; CUDA in a GPU run).
    x = _cubes()
    assert A.apply(x, A.AugmentParams(), _gen()).device == x.device


def test_bench_runs():
    assert A.bench_augment(n=8, shape=(4, 16, 16), batch_size=4) > 0
