"""The machine a result was made on, as far as it decides the bits of the result, and how to match it.

On the CPU a float result is bit-identical run to run, but only for the same kernels and threads: torch's
ATen picks a kernel family (`ATEN_CPU_CAPABILITY`: default, avx2, avx512), oneDNN an instruction set
(`ONEDNN_MAX_CPU_ISA`: AVX2 ... AVX512_CORE_BF16), MKL a code path (`MKL_CBWR`, which also depends on the
CPU's vendor when left automatic), and every reduction depends on the number of threads. The same code,
data and versions on another CPU therefore give other weights unless these four are pinned; each can be
pinned to any family the CPU supports, also after torch is imported (they are read at the first use).

`numerics.cpu_kernels` / `numerics.threads` pin them for a run; `fingerprint()` records what a run used;
`pins_to_match()` is how `fashioncap reproduce` makes a re-run use the original's kernels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

# What `numerics.cpu_kernels` pins, for each family: the same kernels on every x86 CPU that supports them.
FAMILIES = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_CBWR": "AVX512"},
}
# ATen's kernel families on x86, lowest first, with the CPU flags each needs
ATEN_LEVELS = {"default": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}
# oneDNN's x86 instruction sets (ONEDNN_MAX_CPU_ISA names), lowest first, with the CPU flags each needs
_AVX512_CORE = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
ONEDNN_LEVELS = {
    "SSE41": {"sse4_1"},
    "AVX": {"avx"},
    "AVX2": {"avx2"},
    "AVX2_VNNI": {"avx2", "avx_vnni"},
    "AVX512_CORE": _AVX512_CORE,
    "AVX512_CORE_VNNI": _AVX512_CORE | {"avx512_vnni"},
    "AVX512_CORE_BF16": _AVX512_CORE | {"avx512_vnni", "avx512_bf16"},
    "AVX512_CORE_FP16": _AVX512_CORE | {"avx512_vnni", "avx512_bf16", "avx512_fp16"},
    # oneDNN 3 orders AMX above AVX-512 FP16 (AVX512_CORE_AMX is an alias of AVX10_1_512_AMX): every AMX CPU has both
    "AVX512_CORE_AMX": _AVX512_CORE | {"avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16"},
    "AVX512_CORE_AMX_FP16": _AVX512_CORE | {"avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8",
                                            "amx_bf16", "amx_fp16"},
}
# the packages whose versions change numbers (tokenization, image resizing, kernels)
VERSIONED = ("torch", "transformers", "tokenizers", "accelerate", "datasets", "safetensors", "numpy", "pillow")
# the fields that decide the bits of a result; the rest (CPU model, flags) say where it ran
# cpu_vendor too: with every kernel pinned (ATen, oneDNN, MKL: AVX2, 2 threads) an Intel Xeon and an AMD EPYC
# trained other weights from the same data, also with MKL_CBWR=COMPATIBLE (docs/reliability.md): the kernels
# choose their blocking by the CPU's caches, and so their order of summation
NUMERIC_FIELDS = ("device", "gpu", "cuda", "cudnn", "cpu_vendor", "aten_kernels", "onednn_isa", "mkl_cbwr", "threads",
                  "mixed_precision", "lock", "lock_installed", *VERSIONED)
LOCK_FILES = {"cpu": "requirements.lock", "cuda": "requirements-cuda.lock"}


def cpu_info() -> dict[str, str]:
    """The CPU's model, vendor and flags (Linux's /proc/cpuinfo; elsewhere what `platform` knows)."""
    info = {"model": platform.processor() or platform.machine(), "vendor": "", "flags": ""}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for key, field in (("model name", "model"), ("vendor_id", "vendor"), ("flags", "flags")):
        if m := re.search(rf"^{key}\s*:\s*(.*)$", text, re.M):
            info[field] = m.group(1).strip()
    return info


def highest(levels: dict[str, set[str]], flags: set[str]) -> str | None:
    """The highest level whose flags the CPU has (None: not even the lowest, e.g. not x86)."""
    found = None
    for name, needs in levels.items():
        if needs <= flags:
            found = name
    return found


def capped(levels: dict[str, set[str]], supported: str | None, cap: str | None) -> str | None:
    """The level in use: the supported one, lowered to `cap` (an environment variable's value) if lower."""
    names = [n.lower() for n in levels]
    if supported is None or not cap or cap.lower() not in names:
        return supported
    return list(levels)[min(names.index(cap.lower()), names.index(supported.lower()))]


def supports(family: str, flags: set[str]) -> bool:
    """Whether a CPU with these flags can run a `numerics.cpu_kernels` family."""
    pins = FAMILIES[family]
    return (ATEN_LEVELS[pins["ATEN_CPU_CAPABILITY"]] <= flags
            and ONEDNN_LEVELS[pins["ONEDNN_MAX_CPU_ISA"]] <= flags)


def onednn_isa(flags: set[str]) -> str | None:
    """The oneDNN instruction set this process uses: the CPU's highest, lowered by ONEDNN_MAX_CPU_ISA."""
    return capped(ONEDNN_LEVELS, highest(ONEDNN_LEVELS, flags), os.environ.get("ONEDNN_MAX_CPU_ISA"))


def native_bf16() -> bool:
    """Whether this process's CPU kernels compute bf16 natively: torch sees AVX-512 BF16 or AMX on the CPU,
    and oneDNN may use it (a `numerics.cpu_kernels` pin or ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 turns
    it off, so a pinned run keeps its fp32 bits). Without it, bf16 matrix products are emulated: slower
    than fp32, so `mixed_precision: auto` keeps fp32 there."""
    import torch

    detected = [getattr(torch.cpu, name, lambda: False)()
                for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    isa = onednn_isa(set(cpu_info()["flags"].split()))
    levels = list(ONEDNN_LEVELS)
    return any(detected) and isa is not None and levels.index(isa) >= levels.index("AVX512_CORE_BF16")


def gpu_precision(capability: tuple[int, int]) -> str:
    """The autocast precision of a CUDA GPU of this compute capability: bf16 from Ampere (8.0) on; fp16, with
    Accelerate's gradient scaler, on older cards (T4, V100), where bf16 is only emulated."""
    return "bf16" if capability >= (8, 0) else "fp16"


def mixed_precision(requested: str) -> str:
    """`train.mixed_precision` as Accelerate takes it: 'auto' is bf16 on a GPU that computes it (fp16 on an
    older one, gpu_precision) and on a CPU whose kernels compute bf16 natively (native_bf16), else full
    precision ('no'). Call it after pin()."""
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return gpu_precision(torch.cuda.get_device_capability())
    return "bf16" if native_bf16() else "no"


def set_determinism(gpu_deterministic: bool) -> None:
    """Deterministic algorithms on the CPU always (reproduce and the offline figures rely on its bits), and
    on a GPU when `numerics.deterministic` asks (gpu_deterministic). Never the NaN fill of fresh allocations that
    deterministic mode adds (correct code never reads them; it costs a pass over every new tensor), and the
    warning of an op without a deterministic kernel once, not at every call. Off on a GPU: cuDNN picks its
    fastest kernels."""
    import warnings

    import torch

    deterministic = gpu_deterministic or not torch.cuda.is_available()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = not deterministic
    warnings.filterwarnings("once", message=".*does not have a deterministic implementation.*")


def pin(cpu_kernels: str, threads: int | None) -> dict[str, str]:
    """Applies the `numerics` params to this process; call it before the first torch operation. A family
    the CPU lacks is not pinned (a warning says so): the fingerprint then records what ran instead."""
    import torch

    pinned = {}
    if cpu_kernels != "native" and not torch.cuda.is_available():
        flags = set(cpu_info()["flags"].split())
        if supports(cpu_kernels, flags):
            pinned = FAMILIES[cpu_kernels]
            os.environ.update(pinned)
            used = torch.backends.cpu.get_cpu_capability().lower()
            if used != pinned["ATEN_CPU_CAPABILITY"]:
                log.warning("numerics.cpu_kernels %s: torch had already chosen its %s kernels in this process",
                            cpu_kernels, used)
        else:
            log.warning("numerics.cpu_kernels %s: this CPU does not support it; its own kernels are used, so "
                        "results will differ from runs that had it", cpu_kernels)
    if threads:
        torch.set_num_threads(threads)
        pinned = {**pinned, "threads": str(threads)}
    return pinned


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(text: str) -> dict[str, str]:
    """name -> version for every `name==version` line of a lock file (names canonical)."""
    return {_canonical(m.group(1)): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", text, re.M)}


def lock_state(lock_file: Path) -> dict[str, str]:
    """The lock file's digest, and whether the installed packages are the ones it pins."""
    if not lock_file.is_file():
        return {"lock": "none", "lock_installed": f"no {lock_file.name}"}
    text = lock_file.read_text()
    differ = [f"{name} {_version(name)} (locked {version})" for name, version in sorted(lock_pins(text).items())
              if _version(name) != version]
    return {"lock": f"{lock_file.name}:{hashlib.sha256(text.encode()).hexdigest()[:16]}",
            "lock_installed": "matches" if not differ else f"{len(differ)} differ: " + ", ".join(differ)[:400]}


def fingerprint(root: Path, mixed_precision: str) -> dict[str, str]:
    """What this process computes with: device, kernels, threads, versions, the lock. Flat strings."""
    import torch

    cpu = cpu_info()
    flags = set(cpu["flags"].split())
    cuda = torch.cuda.is_available()
    onednn = onednn_isa(flags)
    fields = {
        "device": "cuda" if cuda else "cpu",
        "gpu": torch.cuda.get_device_name(0) if cuda else "none",
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if cuda else "none",
        "cpu": cpu["model"],
        "cpu_vendor": cpu["vendor"] or "unknown",
        "cpu_flags": " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")))),
        "aten_kernels": torch.backends.cpu.get_cpu_capability().lower(),
        "onednn_isa": onednn or "none",
        "mkl_cbwr": os.environ.get("MKL_CBWR", "auto") if torch.backends.mkl.is_available() else "no mkl",
        "threads": str(torch.get_num_threads()),
        "mixed_precision": mixed_precision,
        "deterministic": "on" if torch.are_deterministic_algorithms_enabled() else "off",
        "python": platform.python_version(),
        **{name: _version(name) for name in VERSIONED},
    }
    return {**fields, **lock_state(root / LOCK_FILES[fields["device"]])}


def numeric_differences(original: dict[str, str], other: dict[str, str]) -> list[str]:
    """The fields that decide a result's bits and differ."""
    return [k for k in NUMERIC_FIELDS if original.get(k) != other.get(k)]


def pins_to_match(original: dict[str, str], here: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Environment variables that make a CPU re-run here use the original's kernels and threads, and the
    differences that cannot be pinned (another device, versions, lock, a family this CPU lacks)."""
    flags = set(here.get("cpu_flags", "").split())
    env, unpinnable = {}, []
    for key in numeric_differences(original, here):
        if original.get("device") != "cpu" or here.get("device") != "cpu":
            unpinnable.append(key)
        elif key == "aten_kernels" and ATEN_LEVELS.get(original[key], {"?"}) <= flags:
            env["ATEN_CPU_CAPABILITY"] = original[key]
        elif key == "onednn_isa" and ONEDNN_LEVELS.get(original[key], {"?"}) <= flags:
            env["ONEDNN_MAX_CPU_ISA"] = original[key]
        elif key == "mkl_cbwr" and original[key] not in ("auto", "no mkl") and here.get("mkl_cbwr") != "no mkl":
            env["MKL_CBWR"] = original[key]
        elif key == "threads" and original[key].isdigit():
            env["OMP_NUM_THREADS"] = original[key]
        else:
            unpinnable.append(key)
    return env, unpinnable
