import pytest
import torch
from torch import nn

from synhpc.tta import dihedral_views, predict_tta


class MeanPoolLinear(nn.Module):
    """Global mean pooling then a linear layer: invariant to any permutation of voxels."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x):
        return self.linear(x.mean(dim=(2, 3, 4))).squeeze(1)


class CornerReader(nn.Module):
    """Reads one corner voxel: changes whenever the cube is rotated or mirrored."""

    def forward(self, x):
        return x[:, 0, 0, 0, 0] * 3.0 + x[:, 0, -1, 0, -1]


def _cubes(shape=(3, 1, 4, 6, 6), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_view_counts_and_shapes():
    cube = _cubes()
    assert len(dihedral_views(cube)) == 8
    assert len(dihedral_views(cube, z_flip=True)) == 16
    assert all(v.shape == cube.shape for v in dihedral_views(cube, z_flip=True))
    assert torch.equal(dihedral_views(cube)[0], cube)


def test_all_views_distinct_on_random_cube():
    views = dihedral_views(_cubes(), z_flip=True)
    for i in range(len(views)):
        for j in range(i + 1, len(views)):
            assert not torch.equal(views[i], views[j]), (i, j)


def test_non_square_plane_keeps_shape():
    cube = _cubes((2, 1, 4, 6, 8))
    views = dihedral_views(cube)
    assert len(views) == 4 and len(dihedral_views(cube, z_flip=True)) == 8
    assert all(v.shape == cube.shape for v in views)
    out = predict_tta(CornerReader(), cube, views=16)
    assert out.shape == (2,)


@pytest.mark.parametrize("views", [1, 8, 16])
def test_invariant_model_unchanged(views):
    torch.manual_seed(0)
    model = MeanPoolLinear().eval()
    cube = _cubes()
    assert torch.allclose(predict_tta(model, cube, views=views), model(cube), rtol=0, atol=1e-6)


def test_non_invariant_model_changes_and_equals_manual_mean():
    model = CornerReader()
    cube = _cubes()
    plain = predict_tta(model, cube, views=1)
    tta = predict_tta(model, cube, views=8)
    assert torch.equal(plain, model(cube))
    assert not torch.allclose(plain, tta)
    manual = torch.stack([model(v) for v in dihedral_views(cube)]).mean(0)
    assert torch.allclose(tta, manual, atol=1e-6)


def test_bad_view_count():
    with pytest.raises(ValueError):
        predict_tta(CornerReader(), _cubes(), views=4)
