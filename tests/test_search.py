"""The coarse multi-start search of prostlab register (prostlab.registration.search)."""

from __future__ import annotations

import math

import pytest
import torch

from prostlab.data import example_path, load_prepared
from prostlab.errors import ProstlabError
from prostlab.geometry import Camera
from prostlab.metrics.functional import mtre
from prostlab.projector import Projector
from prostlab.registration.search import SearchSpace, _best_shifts, coarse_search
from prostlab.similarity.objective import make_objective


@pytest.fixture(scope="module")
def chest():
    prepared = load_prepared(example_path())
    return prepared.ct.downsampled(2)


def test_best_shift_recovers_a_known_translation_of_the_image():
    torch.manual_seed(0)
    image = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 40, 40), 3, 1, 1)[0, 0]
    moved = torch.roll(image, shifts=(3, -5), dims=(0, 1))  # rows +3, columns -5
    moved[:3] = moved[3:6].mean()  # what rolled in from the far side is not content
    shifts, best = _best_shifts(moved, torch.ones_like(moved), image[None], (8, 8))
    assert shifts[0].tolist() == [-5, 3]
    assert 0.5 < float(best[0]) <= 1.0


def test_best_shift_respects_the_limit():
    torch.manual_seed(1)
    image = torch.rand(32, 32)
    moved = torch.roll(image, shifts=(0, 9), dims=(0, 1))
    shifts, _ = _best_shifts(moved, torch.ones_like(moved), image[None], (4, 4))
    assert shifts.abs().max() <= 4


def test_search_brings_a_far_start_into_the_capture_range(chest):
    camera = Camera(sdd=1020, sid=620, height=64, width=64, pixel_spacing=(5.84, 5.84))
    projector = Projector(camera, step=3.5)
    gt = torch.tensor([[0.1, -0.05, 0.08, 10.0, -15.0, 20.0]])
    target = projector(chest.batched(), chest.spacing, gt)
    offset = torch.tensor([math.radians(15), -math.radians(10), math.radians(12), 40, -30, 60])
    start = gt[0] + offset
    objective = make_objective("ncc", projector=projector, ct=chest.batched(), bone=None,
                               spacing=chest.spacing, target=target)
    found = coarse_search(target, start, projector, chest.batched(), chest.spacing, objective,
                          space=SearchSpace(keep=3))
    points = torch.randn(300, 3, generator=torch.Generator().manual_seed(0)).double() * 60
    before = float(mtre(start[None].double(), gt.double(), points)[0])
    after = mtre(found.starts, gt.double().expand(len(found.starts), 6), points)
    assert found.starts.shape == (3, 6) and found.evaluated == 625
    assert bool((found.values[1:] >= found.values[:-1]).all())  # best first
    assert before > 80 and float(after.min()) < 0.6 * before


@pytest.mark.parametrize(
    ("field", "value"),
    [("rotation_step_deg", 0.0), ("depth_mm", -1.0), ("keep", 0), ("shift_mm", math.nan)],
)
def test_search_space_refuses_bad_values(field, value):
    with pytest.raises(ProstlabError, match=f"search.{field}"):
        SearchSpace(**{field: value})


def test_search_space_keeps_at_most_what_it_rescores():
    with pytest.raises(ProstlabError, match="search.keep: expected at most"):
        SearchSpace(keep=8, rescore=4)
