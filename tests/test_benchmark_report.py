"""Benchmark rows -> summaries, files and figures (prostlab.benchmark, prostlab.viz.report)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from prostlab.benchmark import (
    ROW_FIELDS,
    bins_table,
    capture_range,
    compare,
    markdown_table,
    success_by_bin,
    summarise,
    summarise_by_patient,
    validate_rows,
    write_cases_csv,
    write_summary,
)
from prostlab.errors import ProstlabError
from prostlab.viz.report import (
    plot_mtre_cdf,
    plot_success_vs_initial,
    save_overlays,
    save_registration_gif,
)

NAN = math.nan


def row(case, method, final, *, initial=20.0, iterations=100, switch=-1, seconds=1.0, status=None):
    """A row whose final errors scale with ``final`` mTRE (NaN for a failed registration)."""
    if status is None:
        status = "failed" if math.isnan(final) else "converged"
    return {
        "case": case,
        "volume_index": case % 2,
        "method": method,
        "initial_rotation_error_deg": initial / 2,
        "initial_translation_error_mm": initial / 4,
        "initial_mtre_mm": initial,
        "final_rotation_error_deg": final / 2,
        "final_translation_error_mm": final / 4,
        "final_mtre_mm": final,
        "final_mpd_mm": final * 1.5,
        "iterations": iterations,
        "switch_iteration": switch,
        "seconds": seconds,
        "status": status,
        "success": bool(final < 10),
    }


@pytest.fixture
def rows():
    """Two methods over 4 cases, listed out of order; 'net' first seen, 'gradncc' has a NaN."""
    return [
        row(2, "net", 4.0, initial=30.0, iterations=300, switch=50, seconds=3.0),
        row(0, "net", 1.0, initial=10.0, iterations=100, switch=10, seconds=1.0),
        row(1, "net", 2.0, initial=20.0, iterations=200, switch=-1, seconds=2.0),
        row(3, "net", 20.0, initial=40.0, iterations=400, switch=30, seconds=4.0),
        row(1, "gradncc", 9.0, initial=20.0, iterations=50, seconds=0.5),
        row(0, "gradncc", 5.0, initial=10.0, iterations=60, seconds=0.6),
        row(3, "gradncc", NAN, initial=40.0, iterations=70, seconds=0.7),
        row(2, "gradncc", 30.0, initial=30.0, iterations=80, seconds=0.8),
    ]


def test_summarise_statistics(rows):
    s = summarise(rows)
    assert list(s) == ["net", "gradncc"]  # first-seen order
    net, grad = s["net"], s["gradncc"]
    assert (net["n_cases"], net["n_failed"], net["n_success"]) == (4, 0, 3)
    assert net["success_rate"] == pytest.approx(0.75)
    assert net["median_final_mtre_mm"] == pytest.approx(3.0)  # median of 1, 2, 4, 20
    assert net["mean_final_mtre_mm"] == pytest.approx(27.0 / 4)
    assert net["median_final_rotation_error_deg"] == pytest.approx(1.5)
    assert net["median_final_translation_error_mm"] == pytest.approx(0.75)
    assert net["median_initial_mtre_mm"] == pytest.approx(25.0)
    assert net["median_iterations"] == pytest.approx(250.0)
    assert net["median_seconds"] == pytest.approx(2.5)
    assert net["n_switched"] == 3 and net["median_switch_iteration"] == pytest.approx(30.0)
    # The NaN case is a failure: out of the success rate's numerator, out of the mTRE statistics.
    assert (grad["n_cases"], grad["n_failed"], grad["n_success"]) == (4, 1, 2)
    assert grad["success_rate"] == pytest.approx(0.5)
    assert grad["median_final_mtre_mm"] == pytest.approx(9.0)  # median of 5, 9, 30
    assert grad["mean_final_mtre_mm"] == pytest.approx(44.0 / 3)
    assert grad["median_iterations"] == pytest.approx(65.0)  # over all cases, failed included
    assert grad["n_switched"] == 0 and math.isnan(grad["median_switch_iteration"])
    # Re-thresholding the same rows; a 'failed' status with a finite mTRE is still a failure.
    assert summarise(rows, threshold_mm=25.0)["net"]["success_rate"] == pytest.approx(1.0)
    failed_but_close = [row(0, "m", 1.0, status="failed"), row(1, "m", 1.0)]
    assert summarise(failed_but_close)["m"]["n_success"] == 1
    with pytest.raises(ProstlabError, match="threshold_mm"):
        summarise(rows, threshold_mm=0)


def test_cases_csv_round_trip(rows, tmp_path):
    path = write_cases_csv(rows, tmp_path / "deep" / "cases.csv")
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        lines = list(reader)
    assert tuple(header) == ROW_FIELDS
    order = [(int(line[0]), line[2]) for line in lines]
    assert order == [(c, m) for c in range(4) for m in ("net", "gradncc")]
    back = {(int(line[0]), line[2]): dict(zip(header, line, strict=True)) for line in lines}
    assert math.isnan(float(back[(3, "gradncc")]["final_mtre_mm"]))
    assert float(back[(2, "net")]["final_mtre_mm"]) == 4.0
    assert back[(0, "net")]["success"] == "True" and back[(3, "net")]["success"] == "False"
    assert int(back[(1, "net")]["switch_iteration"]) == -1


def test_summary_files_and_sentence(rows, tmp_path):
    s = summarise(rows)
    meta = {"config": "pelvis_small", "checkpoint": "net.ckpt", "commit": "abc1234"}
    json_path, md_path = write_summary(s, tmp_path / "out", meta)
    document = json.loads(json_path.read_text())  # strict JSON: NaN became null
    assert document["meta"]["config"] == "pelvis_small"
    assert document["meta"]["threshold_mm"] == 10.0 and document["meta"]["n_cases"] == 4
    assert "date" in document["meta"]
    assert document["methods"]["gradncc"]["median_switch_iteration"] is None
    assert document["methods"]["net"]["success_rate"] == pytest.approx(0.75)
    md = md_path.read_text()
    assert (
        "| method | cases | failed | success (mTRE < 10 mm) | capture range (mm) | "
        "median mTRE (mm) | mean mTRE (mm) | median mPD (mm) |"
    ) in md
    assert "| net | 4 | 0 | 75.0 % | – | 3.00 | 6.75 | 4.50 |" in md  # too few cases per bin
    assert "| gradncc | 4 | 1 | 50.0 % | – | 9.00 |" in md
    assert bins_table(s) in md and "single view resolves depth poorly" in md
    assert "pelvis_small" in md and "abc1234" in md
    assert markdown_table(s) in md
    assert compare(s, "net", "gradncc") == (
        "net succeeds in 75.0 % vs gradncc 50.0 % of 4 cases (mTRE < 10 mm)"
    )
    with pytest.raises(ProstlabError, match="'ncc'"):
        compare(s, "net", "ncc")
    with pytest.raises(ProstlabError, match="meta.threshold_mm"):
        write_summary(s, tmp_path, {"threshold_mm": 5.0})


def test_per_patient_tables_split_the_rows_by_volume(rows, tmp_path):
    # The fixture's cases 0 and 2 are volume 0, cases 1 and 3 volume 1.
    patients = summarise_by_patient(rows, {0: "chest_a", 1: "chest_b"})
    assert list(patients) == ["chest_a", "chest_b"]
    assert patients["chest_a"]["net"]["n_cases"] == 2
    assert patients["chest_a"]["net"]["success_rate"] == pytest.approx(1.0)  # 1 and 4 mm
    assert patients["chest_b"]["net"]["success_rate"] == pytest.approx(0.5)  # 2 and 20 mm
    assert patients["chest_b"]["gradncc"]["n_failed"] == 1
    assert list(summarise_by_patient(rows, {0: "chest_a"})) == ["chest_a", "volume 1"]
    pooled = summarise(rows)
    json_path, md_path = write_summary(pooled, tmp_path, {}, patients=patients)
    document = json.loads(json_path.read_text())
    assert document["patients"]["chest_b"]["net"]["n_success"] == 1
    assert document["meta"]["test patients"] == "chest_a, chest_b"
    md = md_path.read_text()
    assert md.index("All test patients pooled:") < md.index("Test patient chest_a:") < md.index(
        "Test patient chest_b:")
    assert markdown_table(patients["chest_b"]) in md and markdown_table(pooled) in md
    # One patient: its name in the meta, no second copy of the table.
    _, md_path = write_summary(pooled, tmp_path / "one", {}, patients={"chest_a": pooled})
    assert "test patients: chest_a" in md_path.read_text()
    assert "Test patient" not in md_path.read_text()


def cases_at(method, initials_and_finals, start=0):
    """Rows of ``method`` for (initial mTRE, final mTRE) pairs, cases numbered from ``start``."""
    return [row(start + k, method, final, initial=initial)
            for k, (initial, final) in enumerate(initials_and_finals)]


def test_success_per_initial_mtre_bin():
    rows = cases_at("m", [(0.0, 1.0), (9.99, 20.0), (10.0, 1.0), (55.0, NAN), (149.9, 2.0),
                          (150.0, 3.0), (400.0, 50.0), (-1.0, 1.0), (NAN, 1.0)])
    bins = success_by_bin(rows, 10.0)
    assert [(b["lo_mm"], b["hi_mm"]) for b in bins] == [
        (0.0, 10.0), (10.0, 20.0), (20.0, 40.0), (40.0, 60.0), (60.0, 80.0), (80.0, 100.0),
        (100.0, 150.0), (150.0, None)]
    assert [b["n"] for b in bins] == [2, 1, 0, 1, 0, 0, 1, 2]  # left-closed; -1 and NaN: no bin
    assert [b["n_success"] for b in bins] == [1, 1, 0, 0, 0, 0, 1, 1]
    assert bins[0]["success_rate"] == 0.5 and math.isnan(bins[2]["success_rate"])
    assert [b["n"] for b in success_by_bin(rows, 10.0, [0, 100])] == [4, 3]
    with pytest.raises(ProstlabError, match="bins_mm: expected increasing"):
        success_by_bin(rows, 10.0, [0, 20, 10])


def bins_of(*counts):
    """Bins over the default edges from (n, n_success) pairs (missing bins are empty)."""
    edges = [0, 10, 20, 40, 60, 80, 100, 150, None]
    padded = list(counts) + [(0, 0)] * (8 - len(counts))
    return [{"lo_mm": lo, "hi_mm": hi, "n": n, "n_success": k}
            for lo, hi, (n, k) in zip(edges[:-1], edges[1:], padded, strict=True)]


def test_capture_range_definition():
    # Every measured bin >= 90 % up to 40-60, then 60-80 falls short: 60 mm.
    assert capture_range(bins_of((10, 10), (10, 9), (10, 10), (10, 9), (10, 5))) == 60.0
    # Bins past the first failure do not count, even when they succeed again.
    assert capture_range(bins_of((10, 10), (10, 8), (10, 10))) == 10.0
    # A thin bin (< 5 cases) neither stops nor extends the range: 20-40 with 2/4 is passed over,
    # and the range does not end on the thin bin 60-80 that follows the last measured one.
    assert capture_range(bins_of((10, 10), (10, 10), (4, 2), (10, 10), (3, 3))) == 60.0
    # The first measured bin already fails: 0; no measured bin at all: None.
    assert capture_range(bins_of((10, 8), (10, 10))) == 0.0
    assert capture_range(bins_of((4, 4), (2, 2))) is None
    # Success beyond the last edge: the range stops at the measurement's limit, 150 mm.
    assert capture_range(bins_of(*[(10, 10)] * 8)) == 150.0
    # The rate and the number of cases are knobs; exactly 90 % is inside.
    assert capture_range(bins_of((10, 9), (10, 8)), rate=0.8) == 20.0
    assert capture_range(bins_of((10, 10), (4, 1)), min_cases=4) == 10.0
    with pytest.raises(ProstlabError, match="capture_rate"):
        capture_range(bins_of(), rate=90)
    with pytest.raises(ProstlabError, match="capture_min_cases"):
        capture_range(bins_of(), min_cases=0)


def test_summary_json_and_tables_report_bins_capture_and_mpd(tmp_path):
    # 'wide' captures up to 40 mm (20-40 all succeed, 40-60 half); 'narrow' up to 10 mm.
    pairs = [(5.0, 1.0)] * 5 + [(15.0, 1.0)] * 5 + [(30.0, 1.0)] * 5 + [(50.0, 1.0), (50.0, 30.0)] * 3
    narrow = [(i, f if i < 10 else 40.0) for i, f in pairs]
    rows = cases_at("wide", pairs) + cases_at("narrow", narrow)
    s = summarise(rows, capture_min_cases=5)
    assert s["wide"]["capture_range_mm"] == 40.0 and s["narrow"]["capture_range_mm"] == 10.0
    assert s["wide"]["median_success_mpd_mm"] == pytest.approx(1.5)  # final mPD = 1.5 x mTRE
    assert s["wide"]["median_final_mpd_mm"] == pytest.approx(1.5)
    json_path, md_path = write_summary(s, tmp_path, {"config": "synthetic"},
                                       figures=[("success per bin", "success_vs_initial.png"),
                                                ("mTRE CDF", "mtre_cdf.png")])
    methods = json.loads(json_path.read_text())["methods"]
    wide = methods["wide"]
    for key in ("capture_range_mm", "capture_rate", "capture_min_cases", "median_final_mpd_mm",
                "median_success_mpd_mm", "success_by_initial_mtre"):
        assert key in wide, key
    assert wide["capture_rate"] == 0.9 and wide["capture_min_cases"] == 5
    assert wide["success_by_initial_mtre"][3] == {
        "lo_mm": 40.0, "hi_mm": 60.0, "n": 6, "n_success": 3, "success_rate": 0.5}
    assert wide["success_by_initial_mtre"][-1]["hi_mm"] is None  # the open bin
    assert wide["success_by_initial_mtre"][-1]["success_rate"] is None  # empty: NaN -> null
    table = bins_table(s)
    assert table.splitlines()[0].startswith("| method | 0–10 mm | 10–20 mm | 20–40 mm | 40–60 mm")
    assert table.splitlines()[0].endswith("| ≥150 mm |")
    assert "| wide | 100 % (5/5) | 100 % (5/5) | 100 % (5/5) | 50 % (3/6) | – |" in table
    assert "| narrow | 100 % (5/5) | 0 % (0/5) |" in table
    md = md_path.read_text()
    assert md.index("![success per bin](success_vs_initial.png)") < md.index("| method |")
    assert md.index("![mTRE CDF](mtre_cdf.png)") > md.index(table)
    assert "| wide | 21 | 0 | 85.7 % | 40 |" in markdown_table(s)


def test_validation_names_the_key(rows):
    broken = [dict(r) for r in rows]
    del broken[3]["final_mtre_mm"]
    with pytest.raises(ProstlabError, match=r"rows\[3\]: missing key 'final_mtre_mm'"):
        validate_rows(broken)
    broken = [dict(r) for r in rows]
    broken[5]["status"] = "done"
    with pytest.raises(ProstlabError, match=r"rows\[5\]\.status"):
        summarise(broken)
    broken = [dict(r) for r in rows]
    broken[1]["iterations"] = 1.5
    with pytest.raises(ProstlabError, match=r"rows\[1\]\.iterations: expected an integer"):
        write_cases_csv(broken, "unused.csv")
    with pytest.raises(ProstlabError, match=r"rows\[8\]: case 2 with method 'net'"):
        validate_rows([*rows, dict(rows[0])])
    with pytest.raises(ProstlabError, match="rows: expected a list"):
        validate_rows({"case": 0})


def _size_ok(path, suffix):
    assert path.suffix == suffix and path.is_file() and path.stat().st_size > 1000


def test_figures_are_written(rows, tmp_path):
    rng = np.random.default_rng(0)
    many = [
        row(c, m, float(rng.lognormal(1.5, 1.0)), initial=float(rng.uniform(0, 40)))
        for c in range(30)
        for m in ("gradncc", "net_gradncc")
    ]
    many[3] = row(1, "net_gradncc", NAN, initial=many[3]["initial_mtre_mm"])
    _size_ok(plot_success_vs_initial(many, tmp_path / "a" / "success.png"), ".png")
    _size_ok(plot_success_vs_initial(rows, tmp_path / "s2.png", bins=[0, 15, 45]), ".png")
    far = cases_at("m", [(5.0, 1.0), (120.0, 30.0), (300.0, 2.0)])  # the open bin is drawn
    _size_ok(plot_success_vs_initial(far, tmp_path / "far.png", capture_min_cases=1), ".png")
    _size_ok(plot_mtre_cdf(many, tmp_path / "b" / "cdf.png"), ".png")
    with pytest.raises(ProstlabError, match="bins"):
        plot_success_vs_initial(rows, tmp_path / "x.png", bins=[10, 5])

    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")

    def blob(cx):
        return torch.exp(-((xx - cx) ** 2 + (yy - 8) ** 2) / 8)

    panels = [
        {"title": "case 0", "target": blob(8), "initial": blob(4).numpy(), "final": blob(8)},
        {"title": "case 1", "target": blob(8)[None, None], "initial": blob(12), "final": blob(9)},
    ]
    _size_ok(save_overlays(panels, tmp_path / "c" / "overlays.png"), ".png")
    with pytest.raises(ProstlabError, match=r"panels\[1\]\.final"):
        save_overlays([panels[0], {**panels[1], "final": torch.zeros(8, 8)}], tmp_path / "y.png")

    frames = torch.stack([blob(3.0 + t) for t in range(6)])
    titles = [f"it {t}  mTRE {6 - t:.1f} mm" for t in range(6)]
    gif = save_registration_gif(frames, blob(8), tmp_path / "d" / "reg.gif", fps=5, titles=titles)
    _size_ok(gif, ".gif")
    with Image.open(gif) as image:
        assert sum(1 for _ in ImageSequence.Iterator(image)) == 6
        assert min(image.size) >= 256 and image.info["duration"] == 200
    plain = save_registration_gif(frames.numpy(), blob(8), tmp_path / "plain.gif")
    with Image.open(plain) as image:
        assert image.size == (256, 256)
    with pytest.raises(ProstlabError, match="titles"):
        save_registration_gif(frames, blob(8), tmp_path / "z.gif", titles=titles[:2])
    with pytest.raises(ProstlabError, match="frames"):
        save_registration_gif(frames[:, :8], blob(8), tmp_path / "z.gif")


def test_overlay_is_grey_for_images_that_differ_by_scale_and_offset():
    """A DRR and an X-ray related by I' = a I + b (what NCC ignores) overlay as pure grey."""
    from prostlab.viz.panels import overlay

    image = torch.rand(16, 16, generator=torch.Generator().manual_seed(0))
    rgb = overlay(image, 3.0 * image + 7.0)
    np.testing.assert_allclose(rgb[..., 0], rgb[..., 1], atol=1e-6)
    misaligned = overlay(image, torch.roll(image, 4, dims=1))
    assert np.abs(misaligned[..., 0] - misaligned[..., 1]).mean() > 0.05
