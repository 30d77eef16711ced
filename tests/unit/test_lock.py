"""The locks: the runtime's (CPU and CUDA) are requirements.txt resolved and hold no test tool or extra; the
test suite's lock is requirements-test.txt resolved at the runtime's versions, so it only adds. Every direct
requirement is pinned as asked, every pin hashed and needed, every dependency of pyproject.toml locked, and
this environment is installed from them."""

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from fashioncap.fingerprint import LOCK_FILES, lock_pins, lock_state
from tests.conftest import REPO

RUNTIME_LOCKS = ("requirements.lock", "requirements-cuda.lock")
TEST_LOCK = "requirements-test.lock"
SOURCE = {"requirements.lock": "requirements.txt", "requirements-cuda.lock": "requirements.txt",
          TEST_LOCK: "requirements-test.txt"}


def direct_requirements(source: str) -> list[Requirement]:
    lines = [line.split("#")[0].strip() for line in (REPO / source).read_text().splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def pins(lock: str) -> dict[str, str]:
    return lock_pins((REPO / lock).read_text())


def entries(lock: str) -> dict[str, str]:
    """name -> the lock's whole entry (pin, hashes, `# via` lines)."""
    text = (REPO / lock).read_text()
    starts = list(re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", text, re.M))
    return {canonicalize_name(m.group(1)): text[m.start(): starts[i + 1].start() if i + 1 < len(starts) else None]
            for i, m in enumerate(starts)}


def declared() -> tuple[set[str], set[str]]:
    """pyproject.toml's runtime dependencies and its extras' (the package itself left out), by name."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {canonicalize_name(Requirement(d).name) for d in project["dependencies"]}
    extras = {canonicalize_name(Requirement(d).name) for deps in project["optional-dependencies"].values()
              for d in deps} - {"fashioncap"}
    return core, extras


@pytest.mark.parametrize("lock", [*RUNTIME_LOCKS, TEST_LOCK])
def test_every_direct_requirement_is_pinned_within_its_specifier(lock):
    locked = pins(lock)
    for req in direct_requirements(SOURCE[lock]):
        name = canonicalize_name(req.name)
        assert name in locked, f"{req} is in {SOURCE[lock]} but not in {lock}: refresh the lock (docs/development.md)"
        assert req.specifier.contains(Version(locked[name]), prereleases=True), \
            f"{lock} pins {name}=={locked[name]}, outside {SOURCE[lock]}'s {req}: refresh the lock"


@pytest.mark.parametrize("lock", [*RUNTIME_LOCKS, TEST_LOCK])
def test_every_pin_is_hashed_and_needed(lock):
    locked = entries(lock)
    direct = {canonicalize_name(r.name) for r in direct_requirements(SOURCE[lock])}
    for name, entry in locked.items():
        assert "--hash=sha256:" in entry, f"{name} has no hash in {lock}"
        via = {canonicalize_name(v) for v in re.findall(r"^\s+#\s+(?:via\s+)?([A-Za-z0-9][A-Za-z0-9._-]*)\s*$",
                                                         entry, re.M)}
        needed = name in direct or bool(via & locked.keys())
        assert needed, f"{lock} pins {name}, which nothing in {SOURCE[lock]} needs any more: refresh the lock"


def test_the_cuda_lock_pins_the_same_versions_as_the_cpu_lock():
    cpu, cuda = (pins(lock) for lock in RUNTIME_LOCKS)
    assert cpu["torch"].split("+")[0] == cuda["torch"].split("+")[0]
    differ = {n: (cpu[n], cuda[n]) for n in cpu.keys() & cuda.keys() if n != "torch" and cpu[n] != cuda[n]}
    assert not differ, f"the locks disagree: {differ}"
    assert not cpu.keys() - cuda.keys(), "packages only in the CPU lock"
    assert any(n.startswith("nvidia-") for n in cuda.keys() - cpu.keys()), "the CUDA lock has no CUDA libraries"


def test_the_runtime_locks_hold_no_test_tool_or_extra_and_the_test_lock_only_adds():
    core, extras = declared()
    tools = {canonicalize_name(r.name) for r in direct_requirements("requirements-test.txt")}
    test = pins(TEST_LOCK)
    for lock in RUNTIME_LOCKS:
        runtime = pins(lock)
        assert not (tools | extras) & runtime.keys(), f"{lock} holds {sorted((tools | extras) & runtime.keys())}"
        differ = {n: (runtime[n], test[n]) for n in runtime.keys() & test.keys() if runtime[n] != test[n]}
        assert not differ, f"{TEST_LOCK} would change {lock}'s pins: {differ}"
    assert "torch" not in test  # it installs on top of either runtime lock


def test_every_dependency_the_package_declares_is_locked():
    core, extras = declared()
    for lock in RUNTIME_LOCKS:
        assert not core - pins(lock).keys(), f"pyproject.toml declares {sorted(core - pins(lock).keys())}, not in {lock}"
    assert not extras - pins(TEST_LOCK).keys(), f"extras {sorted(extras - pins(TEST_LOCK).keys())} not in {TEST_LOCK}"


def test_this_environment_is_its_locks():
    import torch

    for lock in (LOCK_FILES["cuda" if torch.cuda.is_available() else "cpu"], TEST_LOCK):
        state = lock_state(REPO / lock)
        assert state["lock_installed"] == "matches", f"installed packages differ from {lock}: {state['lock_installed']}"
