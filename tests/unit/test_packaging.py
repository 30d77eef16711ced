"""The package declares what it imports: every third-party import of src/ is a dependency of
pyproject.toml (the Spark job's may be its extra's), so `pip install .` gives a package that runs."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# modules whose imports an extra may hold (the CLI checks that the Spark extra is there before the job)
OPTIONAL = {"catalogue.py": "spark", "cli.py": "spark"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;]", name, maxsplit=1)[0]).lower()


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "fashioncap"}


def test_every_third_party_import_of_the_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {canonical(d) for d in project["dependencies"]}
    extras = {name: {canonical(d) for d in deps} for name, deps in project["optional-dependencies"].items()}
    distributions = metadata.packages_distributions()
    missing = []
    for path in sorted((ROOT / "src" / "fashioncap").rglob("*.py")):
        allowed = core | extras.get(OPTIONAL.get(path.name, ""), set())
        for module in sorted(imports(path)):
            names = {canonical(d) for d in distributions.get(module, [module])}
            if not names & allowed:
                missing.append(f"{path.relative_to(ROOT)}: {module} ({', '.join(sorted(names))})")
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(missing)


def test_the_check_sees_an_undeclared_import(tmp_path):
    (tmp_path / "m.py").write_text("import os\nimport nltk.tokenize\nfrom yaml import safe_load\nfrom . import x\n")
    assert imports(tmp_path / "m.py") == {"nltk", "yaml"}
    assert canonical("psycopg[binary]>=3.1") == "psycopg" and canonical("PyYAML") == "pyyaml"


def test_the_installed_environment_has_no_broken_requirement():
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
