"""Pinning kernels in a real process: the oneDNN instruction set recorded is the one oneDNN reports, and a
family pinned after a stage's imports computes the same bits as a process started with it."""

import json
import os
import subprocess
import sys

import pytest

from fashioncap import fingerprint as fp

HERE = set(fp.cpu_info()["flags"].split())


def oneDNN_isa_reported(env: dict[str, str]) -> str:
    """The instruction set oneDNN itself reports for a convolution, in a fresh process."""
    code = "import torch; torch.nn.Conv2d(3, 8, 4, 4)(torch.randn(1, 3, 32, 32))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **env, "ONEDNN_VERBOSE": "1"}).stdout
    return next(line.split("isa:")[1].strip() for line in out.splitlines() if ",isa:" in line)


@pytest.mark.skipif(not fp.supports("avx2", HERE), reason="an x86 CPU with AVX2")
def test_the_recorded_onednn_isa_is_the_one_onednn_uses():
    """No table of oneDNN's names (they change between its versions, and a CPU kind the table lacked once
    failed here): oneDNN capped at the level we record reports what it reports uncapped (we record nothing
    lower than it uses), and capped one level lower it reports something else (nothing higher)."""
    native = fp.highest(fp.ONEDNN_LEVELS, HERE)
    uncapped = oneDNN_isa_reported({})
    assert oneDNN_isa_reported({"ONEDNN_MAX_CPU_ISA": native}) == uncapped
    below = list(fp.ONEDNN_LEVELS)[list(fp.ONEDNN_LEVELS).index(native) - 1]
    assert oneDNN_isa_reported({"ONEDNN_MAX_CPU_ISA": below}) != uncapped, (native, below, uncapped)
    assert oneDNN_isa_reported({"ONEDNN_MAX_CPU_ISA": "AVX2"}) == "Intel AVX2"


@pytest.mark.parametrize(("flags", "level"), [
    ("avx2 fma", "AVX2"),
    ("avx2 fma avx512f avx512bw avx512vl avx512dq avx512_vnni avx512_bf16", "AVX512_CORE_BF16"),  # AMD EPYC (Zen 4)
    # Intel Xeon Sapphire Rapids: AVX-512 FP16 and AMX
    ("avx2 fma avx512f avx512bw avx512vl avx512dq avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_int8 amx_bf16",
     "AVX512_CORE_AMX"),
    ("avx2 fma avx512f avx512bw avx512vl avx512dq avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_int8 amx_bf16 "
     "amx_fp16", "AVX512_CORE_AMX_FP16"),  # Granite Rapids
])
def test_every_onednn_level_a_cpu_kind_reports_is_known(flags, level):
    assert fp.highest(fp.ONEDNN_LEVELS, set(flags.split())) == level
    assert fp.capped(fp.ONEDNN_LEVELS, level, "AVX2") == "AVX2"


PIN_AFTER_IMPORTS = """
import hashlib, json, sys
import fashioncap.train, fashioncap.evaluate  # every import a stage makes, before the pin
from fashioncap import fingerprint
import torch
if sys.argv[1] == "pin":
    fingerprint.pin("avx2", 1)
g = torch.Generator().manual_seed(0)
x, w = torch.randn(64, 3, 24, 24, generator=g), torch.randn(96, 3, 8, 8, generator=g)
y = torch.nn.functional.conv2d(x, w, stride=8).flatten(1)
y = torch.nn.functional.gelu(y @ torch.randn(y.shape[1], 77, generator=g)).softmax(-1)
print(json.dumps({"digest": hashlib.md5(y.numpy().tobytes()).hexdigest(),
                  **{k: v for k, v in fingerprint.fingerprint(fingerprint.Path("."), "no").items()
                     if k in ("aten_kernels", "onednn_isa", "mkl_cbwr", "threads")}}))
"""


@pytest.mark.skipif(not fp.supports("avx2", HERE), reason="an x86 CPU with AVX2")
def test_pinning_after_the_stage_imports_equals_a_process_started_with_the_family():
    def run(mode: str, env: dict[str, str]) -> dict:
        clean = {k: v for k, v in os.environ.items() if k not in (*fp.FAMILIES["avx2"], "OMP_NUM_THREADS")}
        return json.loads(subprocess.run([sys.executable, "-c", PIN_AFTER_IMPORTS, mode], capture_output=True,
                                         text=True, check=True, env={**clean, **env}).stdout.splitlines()[-1])

    pinned = run("pin", {})
    started = run("native", {**fp.FAMILIES["avx2"], "OMP_NUM_THREADS": "1"})
    assert pinned == started
    assert pinned["aten_kernels"] == "avx2" and pinned["onednn_isa"] == "AVX2" and pinned["mkl_cbwr"] == "AVX2"
    assert pinned["threads"] == "1"
