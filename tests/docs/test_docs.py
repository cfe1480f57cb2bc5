"""The docs site: the generated results pages are up to date, the site builds with --strict, and no code
cites a document that is not in the repository."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_results_pages_are_up_to_date(tmp_path):
    """docs/results/ is exactly what ``python -m benchmarks.render_results`` makes of benchmarks/results/."""
    subprocess.run([sys.executable, "-m", "benchmarks.render_results", "--out", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True, text=True, timeout=120)
    generated = {p.name: p.read_text() for p in tmp_path.glob("*.md")}
    committed = {p.name: p.read_text() for p in (ROOT / "docs" / "results").glob("*.md")}
    assert sorted(generated) == sorted(committed), "run: python -m benchmarks.render_results"
    stale = sorted(name for name in generated if generated[name] != committed[name])
    assert not stale, f"stale results pages {stale}: run python -m benchmarks.render_results"


def test_unknown_results_section_in_a_note_is_an_error(tmp_path):
    from benchmarks import render_results

    study = next(s for s in render_results.STUDIES if s.slug == "server-load")
    (tmp_path / "server-load.md").write_text("Words.\n\n<!-- results: no-such-table -->\n")
    with pytest.raises(KeyError, match="no-such-table"):
        render_results.render_study(study, tmp_path)
    (tmp_path / "server-load.md").write_text("Words.\n\n<!-- results: server -->\n\nMore words.\n")
    page = render_results.render_study(study, tmp_path)
    assert page.index("Words.") < page.index("| phase |") < page.index("More words.")
    assert "## Recorded tables" not in page  # the only section was placed by the note


def test_site_builds_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module)
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert (tmp_path / "site" / "results" / "img" / "bench_diffusers" / "speedup_vs_deviation.png").is_file()


def test_code_cites_no_document_outside_the_repository():
    """Docstrings point to the docs site's pages, not to a specification that is not in the repository."""
    pattern = re.compile("SPEC" + r" section \d")
    folders = ("bac", "policies", "envs", "runtime", "eval", "apps", "configs", "benchmarks", "tests")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders
