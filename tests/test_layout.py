"""The layout holds: the library imports without the training application, no module imports itself
through others, the layers of docs/layout.md hold, files fit one reading, every relative link of the
documentation resolves, and nothing in the repository points to a document outside it."""
import ast
import json
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from urllib.parse import unquote

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


def test_ci_runs_the_readmes_two_set_up_commands():
    """CI installs and tests exactly as the README tells a user to (a green CI must not hide an install step)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("## Set-up"):].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2 and ci[-2:] == commands, (commands, ci[-2:])


# ---- the import graph ------------------------------------------------------------------------------
def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = REPO) -> dict[str, dict[str, str]]:
    """``{module: {imported module: "file:line"}}`` over upo/ and upo_kernels/, imports inside functions included
    (a deferred import still ties two modules). An import of a name resolves to the deepest module it names
    (``from upo.heads import peft`` -> ``upo.heads.peft``); modules outside the packages keep their dotted name."""
    paths = {_module_name(root, p): p for package in PACKAGES for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, dict[str, str]] = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = graph.setdefault(module, {})
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package, one level up per extra dot
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base for alias in node.names]
            else:
                continue
            for name in names:
                inside = name
                while inside and inside not in paths:
                    inside = inside.rpartition(".")[0]
                target = inside or name
                if target != module:
                    edges.setdefault(target, f"{path.relative_to(root)}:{node.lineno}")
    return graph


def import_circles(graph: dict[str, dict[str, str]]) -> list[tuple[list[str], list[str]]]:
    """Each group of modules that import each other (Tarjan's strongly connected components), sorted, with one
    loop ``[a, b, ..., a]`` through it: the shortest through the group's first module."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        for target in graph.get(module, ()):
            if target not in graph:
                continue
            if target not in order:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], order[target])
        if low[module] == order[module]:
            group = set()
            while not group or module not in group:
                group.add(stack.pop())
            if len(group) > 1:
                groups.append(group)

    for module in sorted(graph):
        if module not in order:
            visit(module)
    loops = []
    for group in groups:  # breadth first from the group's first module back to it: the shortest loop
        start = min(group)
        paths, queue, loop = {start: [start]}, [start], None
        while loop is None:  # the group is strongly connected, so the way back exists
            module = queue.pop(0)
            for target in sorted(graph[module]):
                if target == start:
                    loop = paths[module] + [start]
                    break
                if target in group and target not in paths:
                    paths[target] = paths[module] + [target]
                    queue.append(target)
        loops.append((sorted(group), loop))
    return loops


def describe_circle(graph: dict[str, dict[str, str]], loop: list[str]) -> str:
    """``a -> b (a.py:12) -> a (b.py:3)``: each import of the loop with the line that makes it."""
    steps = [loop[0]] + [f"{b} ({graph[a][b]})" for a, b in zip(loop, loop[1:])]
    return " -> ".join(steps)


def test_no_import_circles():
    graph = import_graph()
    assert graph.keys() >= {"upo", "upo_kernels", "upo.train.trainer"}
    circles = [f"{', '.join(group)}: {describe_circle(graph, loop)}" for group, loop in import_circles(graph)]
    assert not circles, "import circles (untie each by moving what they share to the module that owns it):\n" \
        + "\n".join(circles)


# The layers of docs/layout.md: each names what its modules never import.
APPLICATIONS = ("upo.train", "upo.frontier", "upo.integrations")
MODEL_LIBRARIES = ("transformers", "peft", "trl")


def _within(module: str, prefixes) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def layer_violations(graph: dict[str, dict[str, str]]) -> list[str]:
    """Imports that point up: the kernels know nothing of models (no upo, no model library), the library
    knows nothing of the training application or the integrations, and only the integrations import TRL."""
    rules = [
        (lambda m: _within(m, ["upo_kernels"]), ("upo",) + MODEL_LIBRARIES, "the kernels know nothing of models"),
        (lambda m: _within(m, ["upo"]) and not _within(m, APPLICATIONS), APPLICATIONS + ("trl",),
         "the library knows nothing of the training application, the integrations or TRL"),
        (lambda m: _within(m, ["upo.train", "upo.frontier"]), ("upo.integrations", "trl"),
         "the training application knows nothing of the integrations or TRL"),
    ]
    return [f"{where} imports {target}: {rule}" for module, edges in sorted(graph.items())
            for target, where in edges.items()
            for applies, forbidden, rule in rules if applies(module) and _within(target, forbidden)]


def test_imports_point_down_the_layers():
    violations = layer_violations(import_graph())
    assert not violations, "\n".join(violations)


# ---- links of the documentation -----------------------------------------------------------------------
DOCUMENTS = ("README.md", "docs/**/*.md", "benchmarks/README.md")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
HTML_ANCHOR = re.compile(r"<a\s[^>]*(?:name|id)=\"([^\"]+)\"")


def _prose(text: str) -> str:
    """The text outside fenced code blocks (no link or heading lives in one)."""
    return re.sub(r"^\s*(```|~~~).*?^\s*\1[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text lower-cased, punctuation dropped except '-' and '_',
    each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    kept = "".join(c for c in text if c in "-_ " or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file: one per heading (repeats get -1, -2, ... as on GitHub) and HTML ones."""
    found: set[str] = set()
    text = _prose(path.read_text(encoding="utf-8"))
    for heading in HEADING.findall(text):
        slug = github_slug(re.sub(r"\*\*|__|(?<!\w)[*_]|[*_](?!\w)", "", heading))
        unique, repeat = slug, 0
        while unique in found:
            repeat += 1
            unique = f"{slug}-{repeat}"
        found.add(unique)
    return found | set(HTML_ANCHOR.findall(text))


def broken_links(root: Path = REPO) -> list[str]:
    """``doc: target (why)`` for every relative link whose file or anchor does not exist."""
    documents = sorted({p for pattern in DOCUMENTS for p in root.glob(pattern)})
    broken = []
    for doc in documents:
        text = re.sub(r"`[^`\n]*`", "", _prose(doc.read_text(encoding="utf-8")))  # code spans are no links
        for target in LINK.findall(text) + REFERENCE.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:
                continue
            file_part, _, anchor = unquote(target).partition("#")
            path = (doc.parent / file_part).resolve() if file_part else doc
            where = f"{doc.relative_to(root)}: {target}"
            if not path.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{where} (no heading or anchor '{anchor}' in {path.relative_to(root)})")
    return broken


def test_documentation_links_resolve():
    """Every relative link of README.md, docs/ and benchmarks/README.md names a file of the repository and,
    into a Markdown file, one of its headings."""
    assert (REPO / "docs" / "layout.md") in {p for p in REPO.glob(DOCUMENTS[1])}
    broken = broken_links()
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("heading, slug", [
    ("Training with `--tp`", "training-with---tp"),
    ("UPO (`upo/losses/upo.py`)", "upo-upolossesupopy"),
    ("Mixed precision: one path for a log-prob", "mixed-precision-one-path-for-a-log-prob"),
    ("`beta_aux`, `omega_max` and the baseline", "beta_aux-omega_max-and-the-baseline"),
    ("What [this](x.md) does", "what-this-does"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug
