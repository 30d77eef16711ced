"""The locks are requirements.txt resolved: every direct requirement pinned as asked, every pin hashed and
needed, the CUDA lock on the same versions, and this environment installed from the CPU lock."""

import re

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from fashioncap.fingerprint import LOCK_FILES, lock_pins, lock_state
from tests.conftest import REPO

LOCKS = ("requirements.lock", "requirements-cuda.lock")


def direct_requirements() -> list[Requirement]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]


def entries(lock: str) -> dict[str, str]:
    """name -> the lock's whole entry (pin, hashes, `# via` lines)."""
    text = (REPO / lock).read_text()
    starts = list(re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", text, re.M))
    return {canonicalize_name(m.group(1)): text[m.start(): starts[i + 1].start() if i + 1 < len(starts) else None]
            for i, m in enumerate(starts)}


@pytest.mark.parametrize("lock", LOCKS)
def test_every_direct_requirement_is_pinned_within_its_specifier(lock):
    pins = lock_pins((REPO / lock).read_text())
    for req in direct_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is in requirements.txt but not in {lock}: refresh the lock (README)"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), \
            f"{lock} pins {name}=={pins[name]}, outside requirements.txt's {req}: refresh the lock"


@pytest.mark.parametrize("lock", LOCKS)
def test_every_pin_is_hashed_and_needed(lock):
    locked = entries(lock)
    direct = {canonicalize_name(r.name) for r in direct_requirements()}
    for name, entry in locked.items():
        assert "--hash=sha256:" in entry, f"{name} has no hash in {lock}"
        via = {canonicalize_name(v) for v in re.findall(r"^\s+#\s+(?:via\s+)?([A-Za-z0-9][A-Za-z0-9._-]*)\s*$",
                                                         entry, re.M)}
        needed = name in direct or bool(via & locked.keys())
        assert needed, f"{lock} pins {name}, which nothing in requirements.txt needs any more: refresh the lock"


def test_the_cuda_lock_pins_the_same_versions_as_the_cpu_lock():
    cpu, cuda = (lock_pins((REPO / lock).read_text()) for lock in LOCKS)
    assert cpu["torch"].split("+")[0] == cuda["torch"].split("+")[0]
    differ = {n: (cpu[n], cuda[n]) for n in cpu.keys() & cuda.keys() if n != "torch" and cpu[n] != cuda[n]}
    assert not differ, f"the locks disagree: {differ}"
    assert not cpu.keys() - cuda.keys(), "packages only in the CPU lock"
    assert any(n.startswith("nvidia-") for n in cuda.keys() - cpu.keys()), "the CUDA lock has no CUDA libraries"


def test_this_environment_is_its_lock():
    import torch

    lock = LOCK_FILES["cuda" if torch.cuda.is_available() else "cpu"]
    state = lock_state(REPO / lock)
    assert state["lock_installed"] == "matches", f"installed packages differ from {lock}: {state['lock_installed']}"
