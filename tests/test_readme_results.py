"""Every results block in the READMEs equals what its committed results file renders to."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("render_readme", REPO / "benchmarks" / "render_readme.py")
render_readme = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_readme)


def test_readme_blocks_equal_their_results_files():
    stale = []
    for readme in render_readme.READMES:
        _, changed = render_readme.render(readme.read_text())
        stale += [f"{readme.name}: {n}" for n in changed]
    assert not stale, f"README blocks differ from benchmarks/results (run benchmarks/render_readme.py): {stale}"


def test_a_hand_edited_figure_is_caught(tmp_path):
    (tmp_path / "x.md").write_text("| a | 1.0 |\n")
    text = "intro\n<!-- results:x -->\n| a | 1.0 |\n<!-- /results:x -->\nend\n"
    assert render_readme.render(text, tmp_path) == (text, [])
    edited = text.replace("1.0", "9.9")
    new, changed = render_readme.render(edited, tmp_path)
    assert changed == ["x"] and new == text
