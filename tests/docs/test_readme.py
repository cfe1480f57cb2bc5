"""The README stays short, keeps the set-up commands CI and users run, and its example runs as written."""
import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
START, END = "<!-- --8<-- [start:own-model] -->", "<!-- --8<-- [end:own-model] -->"


def own_model_example() -> str:
    """The Python block between the README's ``own-model`` snippet markers (the docs include the same block)."""
    text = README.read_text()
    assert START in text and END in text, "README.md lost its own-model snippet markers"
    section = text[text.index(START):text.index(END)]
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, f"expected one python block between the markers, found {len(blocks)}"
    return blocks[0]


def test_readme_is_short_and_keeps_the_setup_commands():
    """CI runs the README's test command exactly (.ci/run's last line); the main job's command is beside it."""
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "python -m pytest" in ci_command and f"    {ci_command}\n" in text
    main_job = ci_command.replace('".[test]"', '".[eval]"').replace("python -m pytest -q", "python -m bac.eval")
    assert f"    {main_job}\n" in text


def test_own_model_example_runs_as_written(tmp_path):
    script = tmp_path / "own_model.py"
    script.write_text(own_model_example())
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "bac [bac] 8 blocks, 50 steps per sampling call" in out, out
    found = re.search(r"skipped (\d+)% of block evaluations; relative deviation from full computation ([\d.]+)", out)
    assert found, out
    skipped, deviation = int(found.group(1)), float(found.group(2))
    assert 0 < skipped < 100
    assert deviation < 0.2
    assert (tmp_path / "plan.json").is_file()
