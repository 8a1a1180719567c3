"""The layout holds: the library imports without the training application, files fit one reading,
and nothing in the repository points to a document outside it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 400  # "small enough to read in one sitting"
PACKAGES = ("upo", "upo_kernels")


def test_library_imports_without_the_training_application():
    code = ("import json, sys, upo, upo.losses, upo.rewards, upo.heads, upo_kernels; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('upo', 'transformers', 'trl')))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert "upo.losses" in loaded and "upo_kernels" in loaded
    assert not [m for m in loaded if m == "upo.train" or m.startswith("upo.train.")], loaded
    assert not [m for m in loaded if m.startswith("transformers")], loaded
    assert not [m for m in loaded if m == "trl" or m.startswith(("trl.", "upo.integrations"))], loaded


def test_training_application_package_is_cheap_to_import():
    code = "import json, sys, upo.train; print(json.dumps(sorted(m for m in sys.modules if m.startswith('upo.train'))))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["upo.train"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_source_file_fits_one_reading(package):
    long = {str(p.relative_to(REPO)): n for p in sorted((REPO / package).rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
            and p.name != "make_preferences.py"}  # the data generator is mostly its word tables
    assert not long, f"split these files (over {MAX_LINES} lines): {long}"


def _tracked_text_files():
    listed = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    for name in listed.stdout.splitlines():
        path = REPO / name
        if path.suffix in (".py", ".md", ".sh", ".txt", ".toml", ".cfg", ".ini", ".yaml", ".yml") and path.is_file():
            yield name, path.read_text(encoding="utf-8", errors="replace")


def test_nothing_points_outside_the_repository():
    outside = ("../shared", "shared folder", "DESIGN.md")
    hits = [(name, marker) for name, text in _tracked_text_files() for marker in outside if marker in text]
    hits = [hit for hit in hits if hit[0] != "tests/test_layout.py"]
    assert not hits, hits


def test_docs_links_resolve():
    """Every relative link of README.md and docs/*.md names a file of the repository."""
    import re

    broken = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)", doc.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_ci_runs_the_readmes_two_set_up_commands():
    """CI installs and tests exactly as the README tells a user to (a green CI must not hide an install step)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("## Set-up"):].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2 and ci[-2:] == commands, (commands, ci[-2:])
