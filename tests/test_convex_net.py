"""The convex similarity network, its pose objective and ProST's geodesic-gradient training loss."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fake_devices import on_cuda
from prostlab.errors import ProstlabError
from prostlab.geometry import Camera, geodesic_distance, geodesic_gradient, perturb
from prostlab.projector import Projector
from prostlab.similarity import (
    ConvexSimilarityNet,
    NetObjective,
    direction_loss,
    geodesic_gradient_loss,
    make_objective,
    minmax_normalise,
    pose_gradient,
    unit,
)

SMALL = dict(
    volume_channels=2,
    volume_depth=2,
    volume_hidden=4,
    encoder_channels=[4, 8],
    embedding_dim=8,
    pool_size=2,
)


@pytest.fixture(scope="module")
def case():
    """The bundled example at 16^3 (spacing x 8), a 16 x 16 detector, a target at gt."""
    from prostlab.data import example_path, load_prepared

    prepared = load_prepared(example_path())
    factor = 8
    ct = F.avg_pool3d(prepared.ct.batched(), factor)
    bone = F.avg_pool3d(prepared.bone.batched(), factor)
    spacing = tuple(s * factor for s in prepared.ct.spacing)
    camera = Camera(sdd=1020.0, sid=620.0, height=128, width=128, pixel_spacing=(2.92, 2.92))
    projector = Projector(camera.resized(16, 16), step=0.75 * spacing[0], backend="torch")
    gt = torch.tensor([[0.02, -0.05, 0.03, 2.0, -3.0, 1.0]])
    target = projector(ct, spacing, gt)
    return projector, ct, bone, spacing, gt, target


def _net(projector, seed=0, **kw):
    torch.manual_seed(seed)
    return ConvexSimilarityNet(projector, **{**SMALL, **kw})


def _poses(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.15, 0.15, 0.15, 15.0, 15.0, 15.0], dtype=dtype)
    return torch.randn(n, 6, generator=g, dtype=dtype) * scale


# ------------------------------------------------------------------------------- the network


def test_shapes_and_non_negative(case):
    projector, _, bone, spacing, _, target = case
    net = _net(projector)
    pose = _poses(3)
    lifted = net.lift(bone)
    assert lifted.shape == (1, 3, 16, 16, 16)
    assert torch.equal(lifted[:, :1], bone)  # the input channel is kept
    assert bool((lifted >= 0).all())
    air = bone.expand(1, 2, -1, -1, -1) == 0
    assert bool(air.any()) and bool((lifted[:, 1:][air] == 0).all())  # nothing in air
    projection = net.render(lifted, spacing, pose)
    assert projection.shape == (3, 3, 16, 16)
    assert net.embed_projection(projection).shape == (3, 8)
    assert net.embed_pose(bone, spacing, pose).shape == (3, 8)
    assert net.embed_target(target).shape == (1, 8)
    value = net(bone, spacing, pose, target)
    assert value.shape == (3,) and bool((value >= 0).all()) and bool(torch.isfinite(value).all())
    # The pieces compose to the whole; a batch of targets works too.
    pieces = net.distance(net.embed_pose(bone, spacing, pose), net.embed_target(target))
    assert torch.allclose(value, pieces)
    assert net(bone, spacing, pose, target.expand(3, -1, -1, -1)).shape == (3,)


def test_zero_when_embeddings_match(case):
    projector, _, bone, spacing, _, target = case
    net = _net(projector)
    e = torch.randn(4, 8)
    assert torch.equal(net.distance(e, e.clone()), torch.zeros(4))
    # Make both encoders output their final bias only, the same one: the similarity is 0.
    with torch.no_grad():
        for encoder in (net.projection_encoder, net.target_encoder):
            encoder[-1].weight.zero_()
            encoder[-1].bias.copy_(torch.arange(8.0))
    assert torch.equal(net(bone, spacing, _poses(2), target), torch.zeros(2))


def test_minmax_normalise():
    image = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]]], [[[3.0, 3.0], [3.0, 3.0]]]])
    out = minmax_normalise(image)
    assert torch.allclose(out[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(out[1], torch.zeros(1, 2, 2))


def test_architecture_from_arguments(case):
    projector = case[0]
    net = ConvexSimilarityNet(
        projector.camera,
        volume_channels=3,
        volume_depth=4,
        volume_hidden=5,
        encoder_channels=[2, 3, 4],
        embedding_dim=7,
        pool_size=1,
        activation="leaky_relu",
        step=3.0,
        backend="torch",
    )
    convs3d = [m for m in net.lifter if isinstance(m, nn.Conv3d)]
    assert len(convs3d) == 4 and convs3d[0].in_channels == 1 and convs3d[-1].out_channels == 3
    assert all(c.out_channels == 5 for c in convs3d[:-1])
    for encoder, c_in in ((net.projection_encoder, 4), (net.target_encoder, 1)):
        convs = [m for m in encoder if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == [2, 3, 4] and convs[0].in_channels == c_in
        assert encoder[-1].out_features == 7 and encoder[-1].in_features == 4
        assert any(isinstance(m, nn.LeakyReLU) for m in encoder)
    assert net.projector.step == 3.0 and net.camera == projector.camera
    assert net.volume_channels == 3


def test_bad_arguments(case):
    projector, _, bone, spacing, _, target = case
    with pytest.raises(ProstlabError, match="volume_channels: expected an integer >= 1"):
        ConvexSimilarityNet(projector, volume_channels=0)
    with pytest.raises(ProstlabError, match="volume_depth"):
        ConvexSimilarityNet(projector, volume_depth=2.5)
    with pytest.raises(ProstlabError, match=r"encoder_channels\[1\]"):
        ConvexSimilarityNet(projector, encoder_channels=[4, -1])
    with pytest.raises(ProstlabError, match="encoder_channels: expected a list"):
        ConvexSimilarityNet(projector, encoder_channels=8)
    with pytest.raises(ProstlabError, match=r"activation: expected one of .*'silu'"):
        ConvexSimilarityNet(projector, activation="gelu6")
    with pytest.raises(ProstlabError, match="projector: expected"):
        ConvexSimilarityNet("camera")
    net = _net(projector)
    pose = _poses(2)
    with pytest.raises(ProstlabError, match=r"target: expected shape \(B \| 1, 1, 16, 16\)"):
        net(bone, spacing, pose, target[..., :8])
    with pytest.raises(ProstlabError, match="target: expected a batch of 1 or 2"):
        net(bone, spacing, pose, target.expand(3, -1, -1, -1))
    with pytest.raises(ProstlabError, match=r"bone_volume: expected one floating-point channel"):
        net(bone.expand(1, 2, -1, -1, -1), spacing, pose, target)
    with pytest.raises(ProstlabError, match=r"bone_volume: expected a tensor of shape"):
        net(bone[0], spacing, pose, target)


@pytest.mark.parametrize("depth, batch", [(1, 1), (2, 2), (3, 1)])
def test_lift_on_the_bone_equals_the_dense_convolutions(case, depth, batch):
    """The lifting CNN run on the bone's voxels (the CPU's way for a bone volume without
    gradient) gives the dense convolutions' lifted volume and parameter gradients, with bone
    on the volume's faces and in its corner, for every depth and a batch of volumes."""
    from prostlab.similarity.convex_net import _convolutions_on_support

    g = torch.Generator().manual_seed(depth)
    shape = (batch, 1, 12, 13, 14)
    bone = torch.zeros(shape, dtype=torch.float64).flatten()
    bone[torch.randperm(bone.numel(), generator=g)[: 6 * batch]] = 0.05
    bone = bone.reshape(shape)
    bone[0, 0, 0, :2, -2:] = 0.04
    net = _net(case[0], volume_depth=depth).double()
    assert net.bone_only
    assert _convolutions_on_support(net.lifter, bone, bone != 0) is not None
    weights = torch.rand(batch, 3, *shape[2:], generator=g, dtype=torch.float64)
    results = []
    for on_support in (True, False):
        net.bone_only = on_support
        lifted = net.lift(bone)
        grads = torch.autograd.grad((weights * lifted).square().sum(), list(net.lifter.parameters()))
        results.append((lifted, *grads))
    for sparse, dense in zip(*results, strict=True):
        torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-14)
    assert results[0][0][:, 1:].abs().sum() > 0


def test_render_of_the_bones_box_equals_the_whole_volume(case):
    """Projecting only the box around the bone (off centre in a non-cubic, anisotropic volume)
    gives the whole volume's images and pose and parameter gradients."""
    g = torch.Generator().manual_seed(7)
    bone = torch.zeros(1, 1, 16, 12, 14, dtype=torch.float64)
    bone[0, 0, 2:7, 6:11, 3:6] = 0.05 * torch.rand(5, 5, 3, generator=g, dtype=torch.float64)
    spacing = (21.0, 24.0, 19.0)
    net = _net(case[0]).double()
    pose = _poses(2, dtype=torch.float64).requires_grad_()
    weights = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)
    results = []
    for bone_only in (True, False):
        net.bone_only = bone_only
        image = net.render(net.lift(bone), spacing, pose)
        grads = torch.autograd.grad((weights * image).square().sum(),
                                    [pose, *net.lifter.parameters()])
        results.append((image, *grads))
    for inside, whole in zip(*results, strict=True):
        torch.testing.assert_close(inside, whole, rtol=1e-9, atol=1e-12)
    assert results[0][0].abs().sum() > 0


def test_lift_runs_on_the_bone_only_where_it_pays():
    """The convolutions run on the bone when the voxels they read are under half the volume;
    a bone volume that fills it, or one that needs a gradient, gets the dense convolutions."""
    from prostlab.similarity.convex_net import _convolutions_on_support

    net = ConvexSimilarityNet(Camera(sdd=100.0, sid=60.0, height=8, width=8,
                                     pixel_spacing=(1.0, 1.0)), **SMALL)
    x = torch.zeros(1, 1, 8, 8, 8)
    x[0, 0, 3, 3, 3] = 1.0
    z = _convolutions_on_support(net.lifter, x, x != 0)
    assert z.shape == (1, 2, 8, 8, 8) and (z[x.expand_as(z) == 0] == 0).all()
    assert _convolutions_on_support(net.lifter, x + 1, x + 1 != 0) is None
    calls = []
    net.lifter.register_forward_hook(lambda *_: calls.append(1))
    net.lift(x.requires_grad_())
    net.lift(x.detach())
    assert calls == [1]


def test_training_step_equals_every_gradient_and_the_dense_lift():
    """A training step of the module (the geodesic-gradient loss and its backward into the
    parameters) gives the losses and parameter gradients of the step that computes every
    gradient the projector's inputs require and lifts with the dense convolutions
    (bench/training.py's "before")."""
    import dataclasses

    from prostlab.data import example_path, load_prepared
    from prostlab.lightning.training import ConvexSimilarityModule
    from prostlab.lightning.volume_bank import VolumeBank
    from prostlab.projector.autograd import every_gradient
    from prostlab.similarity.convex_net import _convolutions_on_support

    prepared = load_prepared(example_path())
    prepared = dataclasses.replace(prepared, ct=prepared.ct.downsampled(4),
                                   bone=prepared.bone.downsampled(4), labels=None)
    torch.manual_seed(0)
    module = ConvexSimilarityModule(
        camera={"sdd": 1020.0, "sid": 620.0, "height": 8, "width": 8,
                "pixel_spacing": [46.72, 46.72]},
        step=12.0, backend="torch", net=SMALL,
    )
    module.volumes = VolumeBank([prepared])
    bone = module.volumes[0].bone
    assert _convolutions_on_support(module.net.lifter, bone, bone != 0) is not None
    batch = {"gt_pose": _poses(2, seed=4) * 0.2, "initial_pose": _poses(2, seed=5),
             "volume_index": torch.tensor([0, 0]), "case": torch.arange(2)}
    results = []
    for before in (False, True):
        module.net.bone_only = not before
        module.zero_grad()
        with every_gradient() if before else contextlib.nullcontext():
            losses = module.case_losses(batch)
            if before:
                losses.mean().backward()
            else:
                module.backward(losses.mean())
        results.append((losses.detach(), *(p.grad for p in module.parameters())))
    for now, before in zip(*results, strict=True):
        torch.testing.assert_close(now, before, rtol=1e-4, atol=1e-5 * float(before.abs().max()))
    assert all(float(g.abs().sum()) > 0 for g in results[0][1:])


def test_double_backward_reaches_every_parameter(case):
    projector, _, bone, spacing, _, target = case
    net = _net(projector)
    params = list(net.parameters())
    pose = _poses(2)
    _, g = pose_gradient(lambda p: net(bone, spacing, p, target), pose, create_graph=True)
    assert g.shape == (2, 6) and g.requires_grad
    grads = torch.autograd.grad(g.square().sum(), params, allow_unused=True)
    for (name, _), grad in zip(net.named_parameters(), grads, strict=True):
        assert grad is not None, name
        assert bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0, name


def test_pose_gradient_matches_finite_differences(case):
    projector, _, bone, spacing, _, target = case
    net = _net(projector).double()
    bone, target = bone.double(), target.double()
    pose = _poses(1, seed=3, dtype=torch.float64)

    def f(p):
        return net(bone, spacing, p, target)

    _, g = pose_gradient(f, pose)
    h = torch.tensor([1e-7] * 3 + [1e-5] * 3, dtype=torch.float64)
    numeric = torch.zeros(6, dtype=torch.float64)
    with torch.no_grad():
        for i in range(6):
            d = torch.zeros(1, 6, dtype=torch.float64)
            d[0, i] = h[i]
            numeric[i] = (f(perturb(pose, d)) - f(perturb(pose, -d)))[0] / (2 * h[i])
    assert torch.allclose(g[0], numeric, rtol=1e-4, atol=1e-6 * numeric.abs().max())


# ------------------------------------------------------------------------------- objectives


def test_net_objective_matches_the_network(case):
    projector, _, bone, spacing, _, target = case
    net = _net(projector)
    pose = _poses(3)
    direct = net(bone, spacing, pose, target)
    cached = NetObjective(net, bone, spacing, target)
    assert torch.allclose(cached(pose), direct, rtol=1e-5, atol=1e-6)
    uncached = NetObjective(net, bone, spacing, target, cache=False)
    assert torch.allclose(uncached(pose), direct, rtol=1e-5, atol=1e-6)
    # Registration differentiates the cached objective in the pose only.
    pose.requires_grad_(True)
    (grad,) = torch.autograd.grad(cached(pose).sum(), pose)
    assert bool(torch.isfinite(grad).all())
    built = make_objective(
        "net", projector=projector, ct=None, bone=bone, spacing=spacing, target=target, net=net
    )
    assert isinstance(built, NetObjective) and built.cache
    assert torch.allclose(built(pose.detach()), direct, rtol=1e-5, atol=1e-6)


def test_make_objective_net_errors(case):
    projector, ct, bone, spacing, _, target = case
    net = _net(projector)
    kw = dict(projector=projector, ct=ct, spacing=spacing, target=target)
    with pytest.raises(ProstlabError, match="net: objective 'net' needs a ConvexSimilarityNet"):
        make_objective("net", bone=bone, **kw)
    with pytest.raises(ProstlabError, match="bone: objective 'net' needs"):
        make_objective("net", bone=None, net=net, **kw)
    other = Projector(projector.camera.resized(8, 8), step=projector.step)
    with pytest.raises(ProstlabError, match="net: the network's camera"):
        make_objective("net", **{**kw, "projector": other}, bone=bone, net=net)
    with pytest.raises(ProstlabError, match="net: expected a ConvexSimilarityNet"):
        NetObjective(nn.Identity(), bone, spacing, target)


@pytest.mark.parametrize("argument", ["bone_volume", "target", "pose"])
def test_a_meta_tensor_is_refused_naming_the_argument(case, argument):
    """A meta tensor has no data; torch raised a device mismatch or 'Tensor.item() cannot be
    called on meta tensors' from inside the network."""
    projector, _, bone, spacing, gt, target = case
    given = {"bone_volume": bone, "target": target, "pose": gt}
    given[argument] = given[argument].to("meta")
    with pytest.raises(ProstlabError, match=rf"^{argument}: expected a tensor on a real device"):
        _net(projector)(spacing=spacing, **given)


# ---------------------------------------------------------------------------- training loss


def test_geodesic_gradient_matches_finite_differences():
    current, gt = _poses(4, seed=5, dtype=torch.float64), _poses(4, seed=6, dtype=torch.float64)
    for w_r, w_t in ((1.0, 1.0), (100.0, 0.01)):
        euclid = geodesic_gradient(current, gt, w_r, w_t)
        riemann = geodesic_gradient(current, gt, w_r, w_t, riemannian=True)
        weights = torch.tensor([w_r] * 3 + [w_t] * 3, dtype=torch.float64)
        assert torch.allclose(riemann * weights, euclid)

        def f(delta, w_r=w_r, w_t=w_t):
            return geodesic_distance(perturb(current, delta), gt, w_r, w_t, squared=True)

        numeric = torch.zeros(4, 6, dtype=torch.float64)
        for i in range(6):
            d = torch.zeros(4, 6, dtype=torch.float64)
            d[:, i] = 1e-4
            numeric[:, i] = (f(d) - f(-d)) / 2e-4
        assert torch.allclose(euclid, numeric, rtol=1e-6, atol=1e-8)
        # The Riemannian gradient is the metric's dual of the differential: <G, v>_w = df(v).
        v = _poses(4, seed=7, dtype=torch.float64)
        dfv = (f(1e-4 * v) - f(-1e-4 * v)) / 2e-4
        assert torch.allclose((weights * riemann * v).sum(-1), dfv, rtol=1e-6, atol=1e-8)
        # Autograd with respect to a perturb delta agrees with it (and not w.r.t. omega).
        _, g = pose_gradient(
            lambda p, w_r=w_r, w_t=w_t: geodesic_distance(p, gt, w_r, w_t, squared=True), current
        )
        assert torch.allclose(g, euclid, rtol=1e-8, atol=1e-10)


def test_loss_is_zero_for_the_geodesic_itself_and_eight_against_it():
    current, gt = _poses(5, seed=8, dtype=torch.float64), _poses(5, seed=9, dtype=torch.float64)

    def geodesic(pose):
        return geodesic_distance(pose, gt, 2.0, 0.5, squared=True)

    loss = geodesic_gradient_loss(geodesic, current, gt, 1.0, 1.0, reduction="none")
    assert loss.shape == (5,) and torch.allclose(loss, torch.zeros(5, dtype=loss.dtype), atol=1e-12)
    # Independent of positive weights: each part is normalised separately.
    assert geodesic_gradient_loss(geodesic, current, gt, 30.0, 0.01).item() < 1e-12
    # Pointing the wrong way costs |2u|^2 = 4 per part.
    anti = geodesic_gradient_loss(lambda p: -geodesic(p), current, gt, reduction="sum")
    assert anti.item() == pytest.approx(5 * 8.0, rel=1e-9)
    # An exact part has no direction and is left out, whatever the network's gradient there.
    same_rotation = torch.cat((gt[:, :3], current[:, 3:]), dim=1)
    assert geodesic_gradient_loss(geodesic, same_rotation, gt).item() < 1e-12
    assert geodesic_gradient_loss(lambda p: -geodesic(p), same_rotation, gt).item() == (
        pytest.approx(4.0, rel=1e-9)
    )

    # A zero weight leaves its term out: a translation-only objective is perfect for w_r = 0.
    def translation_only(pose):
        return geodesic_distance(pose, gt, 0.0, 1.0, squared=True) + pose[:, :3].sum(-1)

    assert geodesic_gradient_loss(translation_only, current, gt, 0.0, 1.0).item() < 1e-12
    assert geodesic_gradient_loss(translation_only, current, gt, 1.0, 1.0).item() > 0.1


def test_unit_and_direction_loss_are_safe_at_zero():
    v = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    out = unit(v)
    (g,) = torch.autograd.grad(out.sum(), v)
    assert torch.equal(out.detach(), torch.zeros(2, 3, dtype=torch.float64))
    assert bool(torch.isfinite(g).all())
    u = unit(torch.tensor([[3.0, 4.0, 0.0]]))
    assert torch.allclose(u, torch.tensor([[0.6, 0.8, 0.0]]))
    a = torch.tensor([[1.0, 0, 0, 0, 2.0, 0]])
    b = torch.tensor([[0, 3.0, 0, 0, 0, 0]])
    # rotation: |e_x - e_y|^2 = 2; translation: G_t = 0 has no direction and counts 0.
    assert direction_loss(a, b).item() == pytest.approx(2.0)
    assert direction_loss(a, b, rot_tolerance=3.0).item() == 0.0
    # translation against -e_z: |e_y + e_z|^2 = 2.
    c = torch.tensor([[0, 3.0, 0, 0, 0, -0.5]])
    assert direction_loss(a, c).item() == pytest.approx(4.0)
    assert direction_loss(a, c, trans_tolerance=0.4).item() == pytest.approx(4.0)
    assert direction_loss(a, c, trans_tolerance=0.6).item() == pytest.approx(2.0)


def test_training_loss_reaches_every_parameter(case):
    projector, _, bone, spacing, gt, target = case
    net = _net(projector)
    current = perturb(gt.expand(2, 6), _poses(2, seed=10))
    loss = geodesic_gradient_loss(
        lambda p: net(bone, spacing, p, target), current, gt, reduction="mean"
    )
    assert loss.dim() == 0 and 0.0 <= loss.item() <= 8.0
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert bool(torch.isfinite(p.grad).all()) and p.grad.abs().sum() > 0, name
    # The same through a NetObjective without the cache, and under no_grad (validation).
    objective = NetObjective(net, bone, spacing, target, cache=False)
    with torch.no_grad():
        again = geodesic_gradient_loss(objective, current, gt)
    assert again.item() == pytest.approx(loss.item(), rel=1e-4, abs=1e-6)


def test_training_loss_bad_input(case):
    current, gt = _poses(2), _poses(2, seed=11)

    def geodesic(p):
        return geodesic_distance(p, gt, squared=True)

    with pytest.raises(ProstlabError, match="reduction: expected one of"):
        geodesic_gradient_loss(geodesic, current, gt, reduction="max")
    with pytest.raises(
        ProstlabError, match=r"objective_fn: expected values of shape \(B,\) = \(2,\)"
    ):
        geodesic_gradient_loss(lambda p: geodesic(p)[:, None], current, gt)
    with pytest.raises(
        ProstlabError, match="objective_fn: expected values that depend on the pose"
    ):
        geodesic_gradient_loss(lambda p: torch.ones(2, requires_grad=True) * 2, current, gt)
    with pytest.raises(ProstlabError, match="gt_pose: expected batch size 2"):
        geodesic_gradient_loss(geodesic, current, _poses(3))
    with pytest.raises(ProstlabError, match=r"current_pose: expected shape \(B, 6\)"):
        geodesic_gradient_loss(geodesic, current[:, :3], gt)
    bad = current.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ProstlabError, match="current_pose: expected finite values"):
        geodesic_gradient_loss(geodesic, bad, gt)
    with pytest.raises(ProstlabError, match="trans_weight"):
        geodesic_gradient_loss(geodesic, current, gt, 1.0, -1.0)


def test_a_network_built_on_meta_is_refused_naming_it(case):
    """Its weights have no data; torch raised 'Tensor on device meta is not on the expected
    device cpu!' from inside the network."""
    projector, _, bone, spacing, gt, target = case
    with torch.device("meta"):
        net = _net(projector)
    needle = r"^net: the ConvexSimilarityNet's weights are on the meta device.*to_empty"
    for call in (lambda: net(bone, spacing, gt, target), lambda: net.embed_target(target),
                 lambda: NetObjective(net, bone, spacing, target),
                 lambda: NetObjective(net, bone, spacing, target, cache=False)):
        with pytest.raises(ProstlabError, match=needle):
            call()


@pytest.mark.parametrize(
    ("argument", "needle"),
    [("bone_volume", "pose: on cpu, but bone_volume is on cuda:0"),
     ("target", "target: on cuda:0, but net is on cpu"),
     ("pose", "pose: on cuda:0, but bone_volume is on cpu")],
)
def test_inputs_on_another_device_than_the_network_are_refused(case, argument, needle):
    projector, _, bone, spacing, gt, target = case
    given = {"bone_volume": bone, "target": target, "pose": gt}
    given[argument] = on_cuda(given[argument])
    with pytest.raises(ProstlabError, match=rf"^{needle}; expected both on one device"):
        _net(projector)(spacing=spacing, **given)
    if argument == "bone_volume":  # the network's own check, which registration reaches
        with pytest.raises(ProstlabError, match=r"^bone_volume: on cuda:0, but net is on cpu"):
            _net(projector).lift(given["bone_volume"])
