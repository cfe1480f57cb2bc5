"""Plan files at the edges of their sizes: nesting that would exhaust Python's recursion, step counts that would
exhaust memory in a heatmap, and heatmap paths that cannot be written. Each a clear error of its kind (for
``bac-plan``: exit status 2 and one ``error:`` line), or a bounded correct handling; nothing left behind."""
import errno
import json
import pathlib
import tracemalloc

import pytest

import bac
from bac.apps.plan import main as plan_cli
from bac.plan import HEATMAP_COLUMNS, MAX_NESTING

pytestmark = pytest.mark.usefixtures("one_thread")

DEEP = 200_000


@pytest.fixture
def plan_data(tiny_denoiser):
    return bac.make_plan(tiny_denoiser(), "every-step", num_steps=8).to_dict()


def nested(depth, opening="[", closing="]"):
    return opening * depth + closing * depth


def params_nested(data, depth):
    data["params"]["x"] = json.loads(nested(depth))
    return data


def calibration_nested(data, depth):
    data["calibration"] = {"samples": 4, "x": json.loads(nested(depth))}
    return data


DEEP_FILES = {
    "200,000 nested lists": (lambda data: nested(DEEP), "nests lists or objects too deeply to be a plan"),
    "200,000 nested objects": (lambda data: '{"a":' * DEEP + "1" + "}" * DEEP, "nests lists or objects too deeply"),
    "a plan with 200,000 nested params": (
        lambda data: json.dumps(data)[:-1] + ', "extra": ' + nested(DEEP) + "}", "nests lists or objects too deeply"),
    "params nested 900 levels": (lambda data: json.dumps(params_nested(data, 900)),
                                 f"field params nests lists and objects deeper than {MAX_NESTING} levels"),
    "calibration nested 900 levels": (lambda data: json.dumps(calibration_nested(data, 900)),
                                      f"field calibration nests lists and objects deeper than {MAX_NESTING} levels"),
}


@pytest.mark.parametrize("case", DEEP_FILES)
def test_deeply_nested_plan_files_are_plan_errors(plan_data, tmp_path, case):
    content, message = DEEP_FILES[case]
    path = tmp_path / "plan.json"
    path.write_text(content(plan_data))
    with pytest.raises(bac.PlanMismatchError) as caught:
        bac.Plan.load(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.parametrize("case", DEEP_FILES)
def test_bac_plan_show_reports_deep_files_in_one_line(plan_data, tmp_path, capsys, case):
    content, message = DEEP_FILES[case]
    path = tmp_path / "plan.json"
    path.write_text(content(plan_data))
    assert plan_cli(["show", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read plan: ") and message in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no heatmap


def test_nesting_within_the_limit_still_loads(plan_data, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(params_nested(plan_data, MAX_NESTING - 1)))
    assert bac.Plan.load(path).params["x"] == json.loads(nested(MAX_NESTING - 1))


def long_plan(plan_data, num_steps, update_steps):
    plan_data["num_steps"] = num_steps
    for block in plan_data["blocks"]:
        block["update_steps"] = list(update_steps)
    return bac.Plan.from_dict(plan_data)


def test_a_heatmap_of_ten_million_steps_is_drawn_in_bounded_memory(plan_data, tmp_path):
    plan = long_plan(plan_data, 10**7, [0, 1, 5_000_000, 9_999_999])
    tracemalloc.start()
    try:
        figure = plan.heatmap(tmp_path / "plan.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100e6, f"{peak / 1e6:.0f} MB"  # a table of 10^7 steps per block would take gigabytes
    shares = figure.axes[0].images[0].get_array()
    assert shares.shape == (len(plan.blocks), HEATMAP_COLUMNS)
    bin_steps = 10**7 // HEATMAP_COLUMNS
    assert shares[0, 0] == 2 / bin_steps and shares[0, HEATMAP_COLUMNS // 2] == 1 / bin_steps
    assert shares[0, -1] == 1 / bin_steps and shares[0, 1:HEATMAP_COLUMNS // 2].sum() == 0
    assert "in bins of 5000 steps" in figure.axes[0].get_xlabel()
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("num_steps, columns", [(HEATMAP_COLUMNS, HEATMAP_COLUMNS), (HEATMAP_COLUMNS + 1, 1001)])
def test_a_heatmap_bins_steps_only_beyond_the_limit(plan_data, num_steps, columns):
    plan = long_plan(plan_data, num_steps, range(num_steps))  # every step computed
    image = plan.heatmap().axes[0].images[0].get_array()
    assert image.shape == (len(plan.blocks), columns)
    assert (image == 1).all()  # a full bin (and the last, shorter one) is fully computed


def fills_the_disk(monkeypatch, tmp_path):
    real_write = pathlib.Path.write_bytes

    def write(path, data):
        real_write(path, bytes(data)[:100])  # a part was written when the disk filled
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pathlib.Path, "write_bytes", write)


def a_folder(tmp_path):
    (tmp_path / "plan.png").mkdir()


HEATMAP_FAULTS = {
    "the disk fills": (fills_the_disk, "plan.png", "error: cannot write heatmap", "No space left on device"),
    "the path is a folder": (lambda mp, tmp: a_folder(tmp), "plan.png", "error: cannot write heatmap", "plan.png"),
    "a format matplotlib cannot write": (lambda mp, tmp: None, "plan.txt", "error: cannot draw a heatmap as",
                                         "the image formats are"),
}


@pytest.mark.parametrize("case", HEATMAP_FAULTS)
def test_heatmaps_that_cannot_be_written_exit_2_and_leave_nothing(plan_data, tmp_path, monkeypatch, capsys, case):
    fault, name, start, detail = HEATMAP_FAULTS[case]
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan_data))
    fault(monkeypatch, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert plan_cli(["show", str(plan_path), "--heatmap", str(tmp_path / name)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(start) and detail in lines[0], captured.err
    assert "every-step" in captured.out  # the summary was printed first
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no image, no temporary file


def test_a_folder_given_as_the_plan_is_refused_in_one_line(tmp_path, capsys):
    assert plan_cli(["show", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read plan: cannot read plan file {tmp_path}")
