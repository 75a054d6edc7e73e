"""NCC, gradient-NCC and the image pose objectives, against hand-computed values and invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from fake_devices import on_cuda
from prostlab.errors import ProstlabError
from prostlab.geometry import Camera, perturb
from prostlab.projector import Projector
from prostlab.similarity import (
    GradientNCCLoss,
    ImageObjective,
    MultiscaleNCCLoss,
    NCCLoss,
    gradient_ncc,
    make_objective,
    multiscale_ncc,
    ncc,
    patch_ncc,
    sobel,
)


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------------------------------- NCC


def test_ncc_hand_computed():
    # x = 1 2 3 4, y = 1 3 2 4: dx = dy' = (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5),
    # cov = (2.25 - .25 - .25 + 2.25) / 4 = 1, var = 5 / 4 each, NCC = 0.8.
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    y = torch.tensor([[[[1.0, 3.0], [2.0, 4.0]]]])
    assert ncc(x, y).item() == pytest.approx(0.8, abs=1e-6)
    # Masking out the last pixel: x = 1 2 3, y = 1 3 2, dx = (-1, 0, 1), dy = (-1, 1, 0),
    # cov = 1/3, var = 2/3 each: NCC = 0.5.
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    assert ncc(x, y, mask).item() == pytest.approx(0.5, abs=1e-6)
    assert ncc(x, y, mask.bool()).item() == pytest.approx(0.5, abs=1e-6)
    # y = -x + 5: NCC = -1.
    assert ncc(x, 5.0 - x).item() == pytest.approx(-1.0, abs=1e-6)


def test_ncc_soft_weights_match_numpy():
    x, y, w = _rand(1, 1, 5, 6, seed=1), _rand(1, 1, 5, 6, seed=2), _rand(1, 1, 5, 6, seed=3)
    xa, ya, wa = (t.numpy().ravel() for t in (x, y, w))
    mx, my = np.average(xa, weights=wa), np.average(ya, weights=wa)
    cov = np.average((xa - mx) * (ya - my), weights=wa)
    expected = cov / np.sqrt(
        np.average((xa - mx) ** 2, weights=wa) * np.average((ya - my) ** 2, weights=wa)
    )
    assert ncc(x, y, w).item() == pytest.approx(expected, rel=1e-12)


def test_ncc_invariances():
    x, y = _rand(3, 2, 8, 9, seed=4), _rand(3, 2, 8, 9, seed=5) + 0.5 * _rand(3, 2, 8, 9, seed=4)
    base = ncc(x, y)
    assert torch.allclose(ncc(y, x), base, atol=1e-12)  # symmetric
    for a, b in ((2.5, -3.0), (0.01, 1.0), (100.0, 50.0), (7.0, 0.0)):
        assert torch.allclose(ncc(a * x + b, y), base, atol=1e-10)
        assert torch.allclose(ncc(x, a * y + b), base, atol=1e-10)
        assert torch.allclose(ncc(-a * x + b, y), -base, atol=1e-10)
    assert torch.allclose(ncc(x, x), torch.ones(3, dtype=x.dtype), atol=1e-12)
    assert bool((base.abs() < 1).all())


def test_ncc_multichannel_is_the_channel_mean():
    x, y = _rand(2, 3, 6, 7, seed=6), _rand(2, 3, 6, 7, seed=7)
    per_channel = torch.stack([ncc(x[:, c : c + 1], y[:, c : c + 1]) for c in range(3)], 1)
    assert torch.allclose(ncc(x, y), per_channel.mean(1), atol=1e-12)


def test_ncc_batching_and_broadcast():
    x, y = _rand(4, 1, 6, 7, seed=8), _rand(4, 1, 6, 7, seed=9)
    batched = ncc(x, y)
    assert batched.shape == (4,)
    for i in range(4):
        assert batched[i].item() == pytest.approx(ncc(x[i : i + 1], y[i : i + 1]).item(), abs=1e-12)
    # A single target broadcasts against a batch of moving images, on either side.
    assert torch.allclose(
        ncc(x, y[:1]), torch.stack([ncc(x[i : i + 1], y[:1])[0] for i in range(4)])
    )
    assert torch.allclose(ncc(y[:1], x), ncc(x, y[:1]), atol=1e-12)


@pytest.mark.parametrize("value", [0.0, 3.0, 1000.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ncc_constant_image_is_zero_with_finite_gradient(value, dtype):
    x = torch.full((2, 1, 8, 8), value, dtype=dtype, requires_grad=True)
    y = _rand(2, 1, 8, 8, seed=10, dtype=dtype).requires_grad_(True)
    for a, b in ((x, y), (y, x), (x, x)):
        out = ncc(a, b)
        assert torch.equal(out.detach(), torch.zeros(2, dtype=dtype))
        gx, gy = torch.autograd.grad(out.sum(), (x, y), allow_unused=True, materialize_grads=True)
        assert bool(torch.isfinite(gx).all()) and bool(torch.isfinite(gy).all())
    for fn in (gradient_ncc, NCCLoss(), GradientNCCLoss()):
        out = fn(x, y)
        (g,) = torch.autograd.grad(out.sum(), x)
        assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(g).all())


def test_ncc_flat_rule_is_relative_to_the_image_scale():
    # Var <= eps * E[x^2] counts as flat: contrast below ~1e-4 of the level, by default.
    x, y = _rand(1, 1, 8, 8, seed=24), _rand(1, 1, 8, 8, seed=25)
    faint = 1e-5 * x + 1.0  # Var / E[x^2] ~ 1e-11
    assert ncc(faint, y).item() == 0.0
    assert ncc(faint, y, eps=1e-14).item() == pytest.approx(ncc(x, y).item(), abs=1e-8)
    tiny = 1e-12 * x  # no offset: scale alone does not make an image flat
    assert ncc(tiny, y).item() == pytest.approx(ncc(x, y).item(), abs=1e-10)


def test_ncc_zero_total_weight_is_zero():
    x, y = _rand(2, 1, 5, 5, seed=11), _rand(2, 1, 5, 5, seed=12)
    mask = torch.ones(2, 1, 5, 5, dtype=x.dtype)
    mask[1] = 0
    out = ncc(x.requires_grad_(True), y, mask)
    assert out[1].item() == 0.0 and out[0].item() == pytest.approx(ncc(x[:1], y[:1]).item())
    (g,) = torch.autograd.grad(out.sum(), x)
    assert bool(torch.isfinite(g).all()) and torch.equal(g[1], torch.zeros_like(g[1]))


@pytest.mark.parametrize("fn", [ncc, gradient_ncc, multiscale_ncc])
def test_masked_out_pixels_are_ignored(fn):
    x, y = _rand(3, 2, 12, 10, seed=13), _rand(3, 2, 12, 10, seed=14)
    mask = torch.ones(1, 1, 12, 10, dtype=x.dtype)
    mask[..., 3:7, 2:6] = 0.0
    mask[..., 9:, :] = 0.4  # soft weights are allowed
    base = fn(x, y, mask)
    x2, y2 = x.clone(), y.clone()
    x2[..., 3:7, 2:6] = 100.0 * _rand(3, 2, 4, 4, seed=15)
    y2[..., 3:7, 2:6] = -7.0
    assert torch.allclose(fn(x2, y2, mask), base, atol=1e-12)
    # ... and they receive no gradient.
    x3 = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x3, y, mask).sum(), x3)
    assert torch.equal(g[..., 3:7, 2:6], torch.zeros_like(g[..., 3:7, 2:6]))
    # A per-sample, per-channel mask of ones changes nothing.
    ones = torch.ones(3, 2, 12, 10, dtype=x.dtype)
    assert torch.allclose(fn(x, y, ones), fn(x, y), atol=1e-12)


def test_ncc_gradcheck():
    x = _rand(2, 1, 5, 4, seed=16).requires_grad_(True)
    y = _rand(2, 1, 5, 4, seed=17).requires_grad_(True)
    mask = (_rand(1, 1, 5, 4, seed=18) > 0.3).double()
    assert torch.autograd.gradcheck(lambda a, b: ncc(a, b, mask), (x, y))
    assert torch.autograd.gradgradcheck(lambda a, b: ncc(a, b), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: gradient_ncc(a, b, mask), (x, y), fast_mode=True)


def test_ncc_bad_input():
    x = torch.rand(2, 1, 5, 5)
    with pytest.raises(ProstlabError, match=r"x: expected .*\(B, C, H, W\)"):
        ncc(x[0], x)
    with pytest.raises(ProstlabError, match="y: expected shape"):
        ncc(x, torch.rand(2, 1, 5, 4))
    with pytest.raises(ProstlabError, match="y: expected batch size 2"):
        ncc(x, torch.rand(3, 1, 5, 5))
    with pytest.raises(ProstlabError, match="x: expected a floating-point"):
        ncc(x.long(), x)
    with pytest.raises(ProstlabError, match=r"mask: expected shape"):
        ncc(x, x, torch.ones(1, 1, 4, 5))
    with pytest.raises(ProstlabError, match=r"mask: expected weights in \[0, 1\]"):
        ncc(x, x, 2 * torch.ones(1, 1, 5, 5))
    with pytest.raises(ProstlabError, match=r"mask: expected weights in \[0, 1\]"):
        ncc(x, x, torch.full((1, 1, 5, 5), float("nan")))
    with pytest.raises(ProstlabError, match="at least 3 x 3"):
        gradient_ncc(torch.rand(1, 1, 2, 5), torch.rand(1, 1, 2, 5))


@pytest.mark.parametrize("argument", ["x", "y", "mask"])
@pytest.mark.parametrize("similarity", [ncc, gradient_ncc, multiscale_ncc])
def test_a_meta_image_is_refused_naming_the_argument(similarity, argument):
    """A meta tensor has no data; torch raised a device mismatch from inside (gradient-NCC of
    two meta images returned a meta tensor)."""
    given = {"x": _rand(2, 1, 8, 8), "y": _rand(2, 1, 8, 8, seed=1),
             "mask": torch.ones(2, 1, 8, 8, dtype=torch.float64)}
    given[argument] = given[argument].to("meta")
    with pytest.raises(ProstlabError, match=rf"^{argument}: expected a tensor on a real device"):
        similarity(**given)


@pytest.mark.parametrize("argument", ["y", "mask"])
@pytest.mark.parametrize("similarity", [ncc, gradient_ncc, multiscale_ncc])
def test_images_on_two_devices_are_refused_naming_both(similarity, argument):
    given = {"x": _rand(2, 1, 8, 8), "y": _rand(2, 1, 8, 8, seed=1),
             "mask": torch.ones(2, 1, 8, 8, dtype=torch.float64)}
    given[argument] = on_cuda(given[argument])
    with pytest.raises(ProstlabError, match=rf"^{argument}: on cuda:0, but x is on cpu; expected"):
        similarity(**given)


# ------------------------------------------------------------------------------ gradient-NCC


def test_sobel_matches_scipy():
    x = _rand(1, 1, 7, 9, seed=19)
    gx, gy = sobel(x)
    a = x[0, 0].numpy()
    # scipy.ndimage.sobel(axis=1) differentiates along the columns; interior = valid region.
    assert np.allclose(gx[0, 0].numpy(), ndimage.sobel(a, axis=1)[1:-1, 1:-1])
    assert np.allclose(gy[0, 0].numpy(), ndimage.sobel(a, axis=0)[1:-1, 1:-1])


def test_gradient_ncc_hand_computed_and_invariances():
    x, y = _rand(2, 1, 9, 8, seed=20), _rand(2, 1, 9, 8, seed=21) + _rand(2, 1, 9, 8, seed=20)
    gx_x, gy_x = sobel(x)
    gx_y, gy_y = sobel(y)
    expected = 0.5 * (ncc(gx_x, gx_y) + ncc(gy_x, gy_y))
    assert torch.allclose(gradient_ncc(x, y), expected, atol=1e-12)
    assert torch.allclose(gradient_ncc(x, x), torch.ones(2, dtype=x.dtype), atol=1e-12)
    assert torch.allclose(gradient_ncc(3.0 * x - 2.0, y), gradient_ncc(x, y), atol=1e-10)
    assert torch.allclose(gradient_ncc(-3.0 * x + 2.0, y), -gradient_ncc(x, y), atol=1e-10)
    assert torch.allclose(gradient_ncc(y, x), gradient_ncc(x, y), atol=1e-12)
    # A linear ramp has a constant gradient image: its NCC along that axis is 0 by definition.
    ramp = torch.arange(8, dtype=x.dtype).expand(1, 1, 9, 8)
    assert gradient_ncc(ramp, y[:1]).item() == 0.0


def test_losses_are_one_minus_similarity():
    x, y = _rand(3, 1, 8, 8, seed=22), _rand(3, 1, 8, 8, seed=23)
    assert torch.allclose(NCCLoss()(x, y), 1 - ncc(x, y))
    assert torch.allclose(GradientNCCLoss()(x, y), 1 - gradient_ncc(x, y))
    assert torch.allclose(NCCLoss()(x, x), torch.zeros(3, dtype=x.dtype), atol=1e-12)
    assert torch.allclose(NCCLoss()(x, -x), torch.full((3,), 2.0, dtype=x.dtype), atol=1e-12)
    mask = torch.ones(1, 1, 8, 8, dtype=x.dtype)
    assert torch.allclose(GradientNCCLoss()(x, y, mask), 1 - gradient_ncc(x, y))


# ----------------------------------------------------------------------------- multiscale NCC


def _smooth(*shape, seed=0, dtype=torch.float64):
    """Random images blurred by a 5 x 5 box: neighbouring pixels correlate, as in a DRR."""
    image = _rand(*shape, seed=seed, dtype=dtype)
    return F.avg_pool2d(F.pad(image, (2, 2, 2, 2), mode="reflect"), 5, stride=1)


def test_patch_ncc_is_the_mean_of_ncc_over_patches():
    # 7 x 9 pixels in a 2 x 2 grid: row r in patch floor(2 r / 7), so rows 0-3 | 4-6 and
    # columns 0-4 | 5-8.
    x, y = _rand(2, 2, 7, 9, seed=30), _rand(2, 2, 7, 9, seed=31)
    w = _rand(1, 1, 7, 9, seed=32)
    tiles = [(slice(0, 4), slice(0, 5)), (slice(0, 4), slice(5, 9)),
             (slice(4, 7), slice(0, 5)), (slice(4, 7), slice(5, 9))]
    expected = sum(ncc(x[..., r, c], y[..., r, c], w[..., r, c]) for r, c in tiles) / 4
    assert torch.allclose(patch_ncc(x, y, 2, w), expected, atol=1e-12)
    assert torch.allclose(patch_ncc(x, y, 1, w), ncc(x, y, w), atol=1e-12)
    both = (patch_ncc(x, y, 1) + patch_ncc(x, y, 3)) / 2
    assert torch.allclose(multiscale_ncc(x, y, grids=(1, 3)), both, atol=1e-12)
    assert torch.allclose(MultiscaleNCCLoss((1, 3))(x, y, w), 1 - multiscale_ncc(x, y, w, (1, 3)))


def test_multiscale_ncc_is_one_for_identical_images_even_with_empty_patches():
    x = _smooth(3, 1, 16, 16, seed=33)
    x[..., :8, :8] = 0.0  # a quarter of air: flat in both images, left out of the patch mean
    assert torch.allclose(multiscale_ncc(x, x), torch.ones(3, dtype=x.dtype), atol=1e-12)
    assert torch.allclose(multiscale_ncc(x, x, grids=(1, 2, 4, 8)), torch.ones(3, dtype=x.dtype))
    # Anatomy missing from one image's patch counts as 0 there, not as left out.
    y = x.clone()
    y[..., 8:, 8:] = 0.0
    # Grid 2: top left flat in both (left out), top right and bottom left 1, bottom right 0.
    assert torch.allclose(patch_ncc(x, y, 2), torch.full((3,), 2 / 3, dtype=x.dtype))


def test_multiscale_ncc_invariances():
    x = _smooth(2, 1, 16, 20, seed=34)
    y = x + 0.3 * _smooth(2, 1, 16, 20, seed=35)
    base = multiscale_ncc(x, y)
    assert bool((base < 1).all()) and bool((base > 0).all())
    assert torch.allclose(multiscale_ncc(y, x), base, atol=1e-12)  # symmetric
    for a, b in ((2.5, -3.0), (0.01, 1.0), (7.0, 0.0)):
        assert torch.allclose(multiscale_ncc(a * x + b, y), base, atol=1e-9)
        assert torch.allclose(multiscale_ncc(x, a * y + b), base, atol=1e-9)
        assert torch.allclose(multiscale_ncc(-a * x + b, y), -base, atol=1e-9)


def test_multiscale_ncc_is_lower_for_misaligned_images():
    x = _smooth(1, 1, 32, 32, seed=36)
    shifted = [multiscale_ncc(torch.roll(x, s, dims=-1)[..., 4:-4], x[..., 4:-4]).item()
               for s in (0, 1, 2, 4)]
    assert shifted[0] == pytest.approx(1.0, abs=1e-12)
    assert shifted[0] > shifted[1] > shifted[2] > shifted[3], shifted


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multiscale_ncc_gradient_is_finite_on_flat_images(dtype):
    flat = torch.full((2, 1, 16, 16), 3.0, dtype=dtype, requires_grad=True)
    y = _smooth(2, 1, 16, 16, seed=37, dtype=dtype)
    partly = y.clone()
    partly[..., 4:12, :] = 0.0  # some patches flat, some not
    partly.requires_grad_(True)
    for a, b in ((flat, y), (y, flat), (flat, flat), (partly, y), (partly, partly)):
        out = MultiscaleNCCLoss()(a, b)
        grads = torch.autograd.grad(out.sum(), (flat, partly), allow_unused=True,
                                    materialize_grads=True)
        assert bool(torch.isfinite(out).all())
        assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert torch.equal(multiscale_ncc(flat, y).detach(), torch.zeros(2, dtype=dtype))


def test_multiscale_ncc_gradcheck():
    x = _rand(2, 1, 8, 6, seed=38).requires_grad_(True)
    y = _rand(2, 1, 8, 6, seed=39).requires_grad_(True)
    mask = (_rand(1, 1, 8, 6, seed=40) > 0.3).double()
    assert torch.autograd.gradcheck(lambda a, b: multiscale_ncc(a, b, mask, (1, 3)), (x, y))
    assert torch.autograd.gradgradcheck(lambda a, b: multiscale_ncc(a, b, grids=(1, 2)), (x, y))


def test_multiscale_ncc_bad_grids():
    x = torch.rand(1, 1, 8, 12)
    with pytest.raises(ProstlabError, match=r"grids\[1\]: expected at most 4 patches"):
        multiscale_ncc(x, x, grids=(1, 5))
    with pytest.raises(ProstlabError, match=r"grids\[0\]: expected an integer"):
        multiscale_ncc(x, x, grids=(0,))
    with pytest.raises(ProstlabError, match="grids: expected a non-empty list"):
        multiscale_ncc(x, x, grids=())
    with pytest.raises(ProstlabError, match="grid: expected an integer"):
        patch_ncc(x, x, 2.5)


# -------------------------------------------------------------------------- pose objectives


@pytest.fixture(scope="module")
def small_case():
    """The bundled chest CT at 32^3 (spacing x 4), a 32 x 32 detector and a target at gt."""
    from prostlab.data import example_path, load_prepared

    prepared = load_prepared(example_path())
    factor = 4
    ct = F.avg_pool3d(prepared.ct.batched(), factor)
    bone = F.avg_pool3d(prepared.bone.batched(), factor)
    spacing = tuple(s * factor for s in prepared.ct.spacing)
    camera = Camera(sdd=1020.0, sid=620.0, height=128, width=128, pixel_spacing=(2.92, 2.92))
    projector = Projector(camera.resized(32, 32), step=0.75 * spacing[0], backend="torch")
    gt = torch.tensor([[0.05, -0.1, 0.02, 3.0, -5.0, 2.0]])
    target = projector(ct, spacing, gt)
    return projector, ct, bone, spacing, gt, target


def _perturbations():
    deg, mm = np.pi / 180, 1.0
    rows = []
    for axis in range(6):
        for sign in (-1.0, 1.0):
            d = [0.0] * 6
            d[axis] = sign * (6 * deg if axis < 3 else 8 * mm)
            rows.append(d)
    rows.append([3 * deg, -3 * deg, 2 * deg, 4.0, 4.0, -4.0])
    return torch.tensor(rows)


@pytest.mark.parametrize("name", ["ncc", "gradncc", "mncc"])
def test_image_objective_is_minimal_at_the_true_pose(small_case, name):
    projector, ct, bone, spacing, gt, target = small_case
    objective = make_objective(
        name, projector=projector, ct=ct, bone=bone, spacing=spacing, target=target
    )
    at_gt = objective(gt)
    assert at_gt.shape == (1,) and at_gt.item() == pytest.approx(0.0, abs=1e-5)
    deltas = _perturbations()
    perturbed = objective(perturb(gt.expand(len(deltas), 6), deltas))
    assert perturbed.shape == (len(deltas),)
    assert bool((perturbed > at_gt + 1e-4).all()), perturbed


def test_image_objective_mask_and_gradient(small_case):
    projector, ct, _, spacing, gt, target = small_case
    mask = torch.ones(1, 1, 32, 32)
    mask[..., :4, :] = 0
    objective = ImageObjective(projector, ct, spacing, target, NCCLoss(), mask)
    pose = perturb(gt, torch.tensor([[0.0, 0.0, 0.0, 6.0, 0.0, 0.0]])).requires_grad_(True)
    value = objective(pose)
    (grad,) = torch.autograd.grad(value.sum(), pose)
    assert bool(torch.isfinite(grad).all())
    # Descending the gradient moves the translation back towards gt (x: + 6 mm too far).
    assert grad[0, 3].item() > 0


def test_make_objective_renders_what_moving_says(small_case):
    projector, ct, bone, spacing, _, target = small_case
    kw = dict(projector=projector, ct=ct, bone=bone, spacing=spacing, target=target)
    for name in ("ncc", "gradncc", "mncc"):
        assert make_objective(name, **kw).volume is ct  # default: the whole CT
        assert make_objective(name, **kw, moving=None).volume is ct
        assert make_objective(name, **kw, moving="bone").volume is bone
    assert isinstance(make_objective("mncc", **kw).loss, MultiscaleNCCLoss)


def test_make_objective_errors(small_case):
    projector, ct, bone, spacing, _, target = small_case
    kw = dict(projector=projector, ct=ct, bone=bone, spacing=spacing, target=target)
    with pytest.raises(ProstlabError, match=r"name: expected .*'ncc', 'gradncc', 'mncc', 'net'.*'mi'"):
        make_objective("mi", **kw)
    with pytest.raises(ProstlabError, match=r"moving: expected one of \['bone', 'ct'\] or None"):
        make_objective("ncc", **kw, moving="lungs")
    with pytest.raises(ProstlabError, match="bone: objective 'gradncc' needs the segmented"):
        make_objective("gradncc", **{**kw, "bone": None}, moving="bone")
    with pytest.raises(ProstlabError, match="net: objective 'net' needs"):
        make_objective("net", **kw)
    with pytest.raises(ProstlabError, match="ct: objective 'ncc' needs"):
        make_objective("ncc", **{**kw, "ct": None})
    with pytest.raises(ProstlabError, match=r"target: expected images of the projector's detector"):
        make_objective("gradncc", **{**kw, "target": target[..., :16]})
    with pytest.raises(ProstlabError, match="loss: expected a callable"):
        ImageObjective(projector, ct, spacing, target, loss="ncc")
