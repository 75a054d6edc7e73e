"""The torch projector against analytic truths, finite differences and itself."""

import math

import pytest
import torch

from fake_devices import on_cuda
from prostlab.errors import ProstlabError
from prostlab.geometry import Camera
from prostlab.projector import Projector
from prostlab.projector.autograd import every_gradient
from prostlab.projector.backends.torch_backend import TorchBackend


def small_camera(size=9, spacing=1.0, sdd=200.0, sid=120.0):
    return Camera(sdd=sdd, sid=sid, height=size, width=size, pixel_spacing=(spacing, spacing))


def pose(rot=(0.0, 0.0, 0.0), trans=(0.0, 0.0, 0.0), dtype=torch.float64):
    return torch.tensor([[*rot, *trans]], dtype=dtype)


def test_uniform_cube_central_ray_is_mu_times_chord():
    """A uniform cube's central pixel holds mu times the cube's side (its chord)."""
    mu, n, s = 0.02, 16, 2.0
    volume = torch.full((1, 1, n, n, n), mu, dtype=torch.float64)
    projector = Projector(small_camera(), step=0.1, backend="torch")
    image = projector(volume, (s, s, s), pose())
    assert image[0, 0, 4, 4].item() == pytest.approx(mu * n * s, rel=2e-3)


def test_uniform_cube_oblique_chord():
    """Rotated 30 degrees about the row axis, the central chord grows to side / cos(30)."""
    mu, n, s = 0.02, 32, 1.0
    volume = torch.full((1, 1, 3 * n, 3 * n, n), mu, dtype=torch.float64)
    projector = Projector(small_camera(), step=0.05, backend="torch")
    angle = math.radians(30.0)
    image = projector(volume, (s, s, s), pose(rot=(0.0, angle, 0.0)))
    # The slab is wide in x and y; its chord along the tilted central ray is n s / cos(angle).
    assert image[0, 0, 4, 4].item() == pytest.approx(mu * n * s / math.cos(angle), rel=5e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bright_voxel_lands_where_K_E_projects_it(seed):
    """The image of one bright voxel is centred on ``K [R | t + sid e_z] X``."""
    g = torch.Generator().manual_seed(seed)
    n, s = 24, 2.0
    volume = torch.zeros(1, 1, n, n, n, dtype=torch.float64)
    index = torch.randint(6, n - 6, (3,), generator=g)
    volume[0, 0, index[0], index[1], index[2]] = 1.0
    camera = Camera(
        sdd=300.0,
        sid=200.0,
        height=64,
        width=48,
        pixel_spacing=(1.0, 1.25),
        principal_point=(25.0, 30.0),
    )
    p = torch.cat(
        [(torch.rand(3, generator=g) - 0.5) * 0.6, (torch.rand(3, generator=g) - 0.5) * 20.0]
    ).to(torch.float64)[None]
    image = Projector(camera, step=0.05, backend="torch")(volume, (s, s, s), p)[0, 0]

    centre = (index.to(torch.float64) - (n - 1) / 2) * s
    expected = camera.project(camera.extrinsics(p)[0] @ torch.cat([centre, torch.ones(1)]))
    v, u = torch.meshgrid(torch.arange(64.0), torch.arange(48.0), indexing="ij")
    weight = image / image.sum()
    centroid = torch.stack(((weight * u).sum(), (weight * v).sum()))
    assert torch.allclose(centroid.double(), expected, atol=0.1)


def test_roll_about_the_beam_rotates_the_image():
    """A quarter turn about the beam (z) axis turns the image a quarter turn."""
    g = torch.Generator().manual_seed(3)
    volume = torch.rand(1, 1, 12, 12, 10, generator=g, dtype=torch.float64)
    projector = Projector(small_camera(size=16), step=0.5, backend="torch")
    spacing = (1.5, 1.5, 2.0)
    straight = projector(volume, spacing, pose())[0, 0]
    rolled = projector(volume, spacing, pose(rot=(0.0, 0.0, math.pi / 2)))[0, 0]
    # R_z(90) takes +x (image right) to +y (image down): a feature at (v, u) moves to (u, -v).
    assert torch.allclose(rolled, torch.rot90(straight, k=-1), atol=1e-9)


def test_translation_shifts_the_image_by_the_magnification():
    """A shift of t mm at the isocentre moves its image by t * sdd / sid / pixel spacing."""
    n, s = 21, 1.0
    volume = torch.zeros(1, 1, n, n, n, dtype=torch.float64)
    volume[0, 0, 8:13, 9:12, 10] = 1.0  # a small flat patch in the isocentre plane
    camera = small_camera(size=81, spacing=0.5, sdd=300.0, sid=150.0)
    projector = Projector(camera, step=0.05, backend="torch")

    def centroid(p):
        image = projector(volume, (s, s, s), p)[0, 0]
        v, u = torch.meshgrid(torch.arange(81.0), torch.arange(81.0), indexing="ij")
        w = image / image.sum()
        return torch.stack(((w * u.double()).sum(), (w * v.double()).sum()))

    shift = centroid(pose(trans=(3.0, -2.0, 0.0))) - centroid(pose())
    expected = torch.tensor([3.0, -2.0], dtype=torch.float64) * camera.magnification / 0.5
    assert torch.allclose(shift, expected, atol=0.02)


def test_batch_equals_items_rendered_alone():
    g = torch.Generator().manual_seed(4)
    volumes = torch.rand(3, 2, 8, 9, 10, generator=g)
    poses = torch.cat(
        [(torch.rand(3, 3, generator=g) - 0.5) * 0.4, (torch.rand(3, 3, generator=g) - 0.5) * 6.0],
        dim=1,
    )
    projector = Projector(small_camera(size=11), step=0.7, backend="torch")
    spacing = (1.0, 0.9, 1.1)
    together = projector(volumes, spacing, poses)
    shared = projector(volumes[:1], spacing, poses)
    for b in range(3):
        alone = projector(volumes[b : b + 1], spacing, poses[b : b + 1])
        assert torch.allclose(together[b], alone[0], atol=1e-6)
        assert torch.allclose(
            shared[b], projector(volumes[:1], spacing, poses[b : b + 1])[0], atol=1e-6
        )


def test_chunking_does_not_change_images_or_gradients():
    g = torch.Generator().manual_seed(5)
    volume = torch.rand(1, 1, 10, 10, 10, generator=g, dtype=torch.float64, requires_grad=True)
    p = pose(rot=(0.1, -0.2, 0.05), trans=(1.0, 2.0, -3.0)).requires_grad_()
    results = []
    for max_samples in (37, 1 << 20):
        projector = Projector(small_camera(), step=0.6, backend="torch", max_samples=max_samples)
        image = projector(volume, (1.0, 1.0, 1.0), p)
        grads = torch.autograd.grad((image**2).sum(), (volume, p))
        results.append((image, *grads))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def _tiny_setup(seed, channels=2):
    g = torch.Generator().manual_seed(seed)
    volume = torch.rand(1, channels, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.cat(
        [(torch.rand(2, 3, generator=g) - 0.5) * 0.5, (torch.rand(2, 3, generator=g) - 0.5) * 2.0],
        dim=1,
    )
    p = p.to(torch.float64).requires_grad_()
    projector = Projector(
        Camera(sdd=60.0, sid=40.0, height=4, width=5, pixel_spacing=(2.0, 1.8)),
        step=0.7,
        backend="torch",
        max_samples=64,
    )
    return projector, volume, p


def test_gradcheck_pose_and_volume():
    projector, volume, p = _tiny_setup(6)
    assert torch.autograd.gradcheck(lambda v, q: projector(v, (1.0, 1.2, 0.9), q), (volume, p))


def test_gradgradcheck_pose_and_volume():
    projector, volume, p = _tiny_setup(7, channels=1)
    assert torch.autograd.gradgradcheck(lambda v, q: projector(v, (1.0, 1.2, 0.9), q), (volume, p))


def test_double_backward_of_a_pose_gradient_reaches_the_volume():
    """The training loss differentiates d(similarity)/d(pose) with respect to the volume."""
    projector, volume, p = _tiny_setup(8)
    image = projector(volume, (1.0, 1.2, 0.9), p)
    (grad_pose,) = torch.autograd.grad((image**2).sum(), p, create_graph=True)
    (grad_volume,) = torch.autograd.grad(grad_pose.square().sum(), volume)
    assert grad_volume.abs().sum() > 0


def test_kernels_skip_the_gradients_a_backward_does_not_use(monkeypatch):
    """Training's pose gradient (autograd.grad to the pose perturbation) scatters no gradient
    into the lifted volume, and the backward into the parameters sums no gradient for the
    perturbation; the parameters' gradient is the one that computing every gradient gives."""
    calls = []

    def recording(name, original):
        def record(self, *args, **kwargs):
            gvol, gM = original(self, *args, **kwargs)
            calls.append((name, gvol is not None, gM is not None))
            return gvol, gM

        return record

    for name in ("vjp", "jvp_vjp"):
        monkeypatch.setattr(TorchBackend, name, recording(name, getattr(TorchBackend, name)))
    projector, volume, p = _tiny_setup(9)
    weight = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)

    def parameter_gradient():
        calls.clear()
        delta = torch.zeros_like(p, requires_grad=True)
        image = projector(volume.detach() * weight, (1.0, 1.2, 0.9), p.detach() + delta)
        (g,) = torch.autograd.grad(image.square().sum(), delta, create_graph=True)
        g.square().sum().backward(inputs=[weight])
        grad, weight.grad = weight.grad, None
        return grad, list(calls)

    pruned, pruned_calls = parameter_gradient()
    with every_gradient():
        full, full_calls = parameter_gradient()
    assert pruned_calls == [("vjp", False, True), ("jvp_vjp", True, False), ("vjp", True, False)]
    assert full_calls == [("vjp", True, True), ("jvp_vjp", True, True), ("vjp", True, True)]
    torch.testing.assert_close(pruned, full, rtol=1e-12, atol=0)


def test_rays_missing_the_volume_give_zero():
    volume = torch.ones(1, 1, 4, 4, 4, dtype=torch.float64)
    image = Projector(small_camera(), step=0.5, backend="torch")(
        volume, (1.0, 1.0, 1.0), pose(trans=(100.0, 0.0, 0.0))
    )
    assert torch.count_nonzero(image) == 0


def test_image_is_continuous_in_the_pose():
    """Anchored samples: a tiny pose change makes a tiny image change, even at the box's faces."""
    g = torch.Generator().manual_seed(9)
    volume = torch.rand(1, 1, 8, 8, 8, generator=g, dtype=torch.float64)
    projector = Projector(small_camera(size=15), step=0.8, backend="torch")
    base = pose(rot=(0.3, 0.2, 0.1), trans=(0.5, 0.3, 0.0))
    steps = torch.linspace(0, 1e-3, 11, dtype=torch.float64)
    images = [
        projector(volume, (1.0, 1.0, 1.0), base + torch.tensor([[0, 0, 0, 0, 0, 1.0]]) * d)
        for d in steps
    ]
    jumps = torch.stack([(b - a).abs().max() for a, b in zip(images, images[1:], strict=False)])
    assert jumps.max() < 1e-3


@pytest.mark.parametrize(
    ("volume", "p", "field"),
    [
        (torch.zeros(4, 4, 4), pose(dtype=torch.float32), "volume"),
        (torch.zeros(1, 1, 4, 4, 4, dtype=torch.int32), pose(dtype=torch.float32), "volume"),
        (torch.zeros(2, 1, 4, 4, 4), pose(dtype=torch.float32).repeat(3, 1), "volume"),
        (torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 5), "pose"),
        (torch.zeros(1, 1, 4, 4, 4), torch.full((1, 6), float("nan")), "pose"),
    ],
)
def test_bad_input_names_the_field(volume, p, field):
    with pytest.raises(ValueError, match=field):
        Projector(small_camera(), step=1.0, backend="torch")(volume, (1.0, 1.0, 1.0), p)


def test_bad_spacing_step_and_backend():
    projector = Projector(small_camera(), step=1.0, backend="torch")
    with pytest.raises(ProstlabError, match="spacing"):
        projector(torch.zeros(1, 1, 4, 4, 4), (1.0, 0.0, 1.0), torch.zeros(1, 6))
    with pytest.raises(ProstlabError, match="step"):
        Projector(small_camera(), step=0.0)
    with pytest.raises(ProstlabError, match="backend"):
        Projector(small_camera(), backend="opencl")


@pytest.mark.parametrize("argument", ["volume", "pose", "extrinsics"])
def test_a_meta_tensor_is_refused_naming_the_argument(argument):
    """A meta tensor has no data; torch raised 'Tensor.item() cannot be called on meta tensors'
    or a device mismatch from deep inside, naming no argument."""
    projector = Projector(small_camera(), step=1.0, backend="torch")
    given = {"volume": torch.zeros(1, 1, 4, 4, 4), "pose": torch.zeros(1, 6)}
    given["extrinsics"] = projector.camera.extrinsics(given["pose"])
    given[argument] = given[argument].to("meta")
    with pytest.raises(ProstlabError, match=rf"^{argument}: expected a tensor on a real device"):
        if argument == "extrinsics":
            projector.render(given["volume"], (1.0, 1.0, 1.0), given["extrinsics"])
        else:
            projector(given["volume"], (1.0, 1.0, 1.0), given["pose"])


@pytest.mark.parametrize(
    ("moved", "needle"),
    [("pose", "pose: on cuda:0, but volume is on cpu"),
     ("volume", "pose: on cpu, but volume is on cuda:0"),
     ("extrinsics", "extrinsics: on cuda:0, but volume is on cpu")],
)
def test_inputs_on_two_devices_are_refused_naming_both(moved, needle):
    """A volume on the CPU and a pose on a GPU failed inside a kernel, naming no argument."""
    projector = Projector(small_camera(), step=1.0, backend="torch")
    given = {"volume": torch.zeros(1, 1, 4, 4, 4), "pose": torch.zeros(1, 6)}
    given["extrinsics"] = projector.camera.extrinsics(given["pose"])
    given[moved] = on_cuda(given[moved])
    with pytest.raises(ProstlabError, match=rf"^{needle}; expected both on one device"):
        if moved == "extrinsics":
            projector.render(given["volume"], (1.0, 1.0, 1.0), given["extrinsics"])
        else:
            projector(given["volume"], (1.0, 1.0, 1.0), given["pose"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cupy_backend_without_cuda_says_so():
    projector = Projector(small_camera(), step=1.0, backend="cupy")
    with pytest.raises(ProstlabError, match="cupy"):
        projector(torch.zeros(1, 1, 4, 4, 4), (1.0, 1.0, 1.0), torch.zeros(1, 6))


def test_half_precision_renders_in_float32():
    volume = torch.rand(1, 1, 6, 6, 6)
    projector = Projector(small_camera(), step=0.5, backend="torch")
    p = pose(rot=(0.1, 0.0, 0.0), dtype=torch.float32)
    half = projector(volume.to(torch.bfloat16), (1.0, 1.0, 1.0), p)
    assert half.dtype == torch.bfloat16
    full = projector(volume.to(torch.bfloat16).float(), (1.0, 1.0, 1.0), p)
    assert torch.allclose(half.float(), full, rtol=1e-2)


def test_volume_behind_the_source_gives_no_image_and_no_gradient():
    volume = torch.ones(1, 1, 4, 4, 4, dtype=torch.float64)
    # Turned about y and moved 200 mm back: the box lies 80 mm behind the source, on the ray's
    # low side, where a clamped sample at the source would still see the volume's gradient.
    p = pose(rot=(0.0, math.pi, 0.0), trans=(0.0, 0.0, -200.0)).requires_grad_()
    image = Projector(small_camera(), step=0.5, backend="torch")(volume, (1.0, 1.0, 1.0), p)
    (grad,) = torch.autograd.grad(image.sum(), p)
    assert torch.count_nonzero(image) == 0 and torch.count_nonzero(grad) == 0
