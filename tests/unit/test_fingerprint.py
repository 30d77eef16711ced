"""The machine's fingerprint: which kernels a CPU can run, which ones a process uses, what a re-run must pin
to match another machine, and the rule a reproduction is held to."""

import pytest

from fashioncap import fingerprint as fp
from fashioncap.reproduce import CROSS_MACHINE_TOLERANCE, GPU_RELATIVE_TOLERANCE, Rule, Target, compare, report, \
    rule, weights_verdict
from tests.conftest import REPO

AVX2_ONLY = {"sse4_1", "sse4_2", "avx", "avx2", "fma"}
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"}


def machine(**changes) -> dict[str, str]:
    """A complete CPU fingerprint (an AVX-512 machine running natively), with some fields changed."""
    base = {"device": "cpu", "gpu": "none", "cuda": "none", "cudnn": "none", "cpu": "AMD EPYC",
            "cpu_vendor": "AuthenticAMD", "cpu_flags": " ".join(sorted(AVX512_BF16)), "aten_kernels": "avx512",
            "onednn_isa": "AVX512_CORE_BF16", "mkl_cbwr": "auto", "threads": "2", "mixed_precision": "no",
            "lock": "requirements.lock:0123456789abcdef", "lock_installed": "matches", "python": "3.11.7",
            **{name: "1.0" for name in fp.VERSIONED}}
    return {**base, **changes}


def test_the_highest_instruction_set_follows_the_cpu_flags_and_the_cap():
    assert fp.highest(fp.ONEDNN_LEVELS, AVX2_ONLY) == "AVX2"
    assert fp.highest(fp.ONEDNN_LEVELS, AVX512_BF16) == "AVX512_CORE_BF16"
    assert fp.highest(fp.ATEN_LEVELS, AVX512_BF16) == "avx512" and fp.highest(fp.ATEN_LEVELS, AVX2_ONLY) == "avx2"
    assert fp.capped(fp.ONEDNN_LEVELS, "AVX512_CORE_BF16", "avx2") == "AVX2"
    assert fp.capped(fp.ONEDNN_LEVELS, "AVX2", "AVX512_CORE") == "AVX2"  # a cap above the CPU changes nothing
    assert fp.capped(fp.ONEDNN_LEVELS, "AVX2", None) == "AVX2"
    assert fp.supports("avx2", AVX2_ONLY) and not fp.supports("avx512", AVX2_ONLY)


def test_fingerprint_records_what_this_process_computes_with():
    import torch

    here = fp.fingerprint(REPO, "no")
    assert here["aten_kernels"] == torch.backends.cpu.get_cpu_capability().lower()
    assert here["threads"] == str(torch.get_num_threads()) and here["torch"] == torch.__version__
    assert here["lock"].startswith("requirements.lock:") and len(here["lock"].split(":")[1]) == 16
    assert set(fp.NUMERIC_FIELDS) <= here.keys()


def test_a_re_run_pins_the_original_family_when_this_cpu_has_it():
    original = machine(aten_kernels="avx2", onednn_isa="AVX2", threads="4", cpu="Intel Xeon")
    env, unpinnable = fp.pins_to_match(original, machine())
    assert env == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "4"}
    assert unpinnable == []
    env, _ = fp.pins_to_match(machine(mkl_cbwr="AVX2"), machine())
    assert env == {"MKL_CBWR": "AVX2"}


def test_what_cannot_be_pinned_is_named():
    amx = machine(onednn_isa="AVX512_CORE_AMX")
    assert fp.pins_to_match(amx, machine()) == ({}, ["onednn_isa"])  # this CPU has no AMX
    avx512_on_avx2 = fp.pins_to_match(machine(), machine(cpu_flags=" ".join(sorted(AVX2_ONLY)),
                                                         aten_kernels="avx2", onednn_isa="AVX2"))
    assert avx512_on_avx2 == ({}, ["aten_kernels", "onednn_isa"])
    gpu = machine(device="cuda", gpu="NVIDIA H100 80GB HBM3", cuda="13.0", mixed_precision="bf16")
    assert fp.pins_to_match(gpu, machine())[1] == ["device", "gpu", "cuda", "mixed_precision"]
    assert fp.pins_to_match(machine(), machine(cpu_vendor="GenuineIntel"))[1] == ["cpu_vendor"]
    # pinned kernels do not make an Intel and an AMD CPU compute the same bits (measured): the vendor decides
    pinned = machine(mkl_cbwr="AVX2", aten_kernels="avx2", onednn_isa="AVX2")
    assert fp.pins_to_match(pinned, {**pinned, "cpu_vendor": "GenuineIntel"}) == ({}, ["cpu_vendor"])
    assert fp.pins_to_match(machine(numpy="2.0"), machine())[1] == ["numpy"]


def test_the_rule_is_exact_for_the_same_machine_or_a_pinned_one():
    assert rule(machine(), machine(), {}).tolerance == 0.0
    pinned = rule(machine(aten_kernels="avx2"), machine(aten_kernels="avx2"), {"ATEN_CPU_CAPABILITY": "avx2"})
    assert pinned.tolerance == 0.0 and "pinned to the original's: ATEN_CPU_CAPABILITY=avx2" in pinned.reason


def test_gpu_against_cpu_gets_the_band_with_its_causes():
    gpu = machine(device="cuda", gpu="NVIDIA H100 80GB HBM3", cuda="13.0", cudnn="91900", mixed_precision="bf16")
    verdict = rule(gpu, machine(), {})
    assert verdict.tolerance == CROSS_MACHINE_TOLERANCE
    for cause in ("device cuda vs cpu", "gpu NVIDIA H100 80GB HBM3 vs none", "mixed_precision bf16 vs no"):
        assert cause in verdict.reason
    assert rule(gpu, gpu, {}).tolerance == GPU_RELATIVE_TOLERANCE
    other_lock = rule(machine(), machine(lock_installed="1 differ: pillow 12.0 (locked 13.0)"), {})
    assert other_lock.tolerance == CROSS_MACHINE_TOLERANCE and "lock_installed" in other_lock.reason


def test_runs_from_before_fingerprints_keep_their_device_rule():
    assert rule({}, machine(), {}) == Rule(0.0, "the original's machine was not recorded: holding it to identical "
                                                "metrics")
    assert rule({"device": "cuda"}, machine(), {}).tolerance == GPU_RELATIVE_TOLERANCE


def test_the_report_shows_both_machines_and_the_rule():
    original = machine(aten_kernels="avx2")
    verdict = rule(original, machine(), {})
    rows, same = compare({"test_after_cider_d": 1.0}, {"test_after_cider_d": 1.03}, verdict.tolerance)
    text = report(Target("r", "run x", {"test_after_cider_d": 1.0}, original, "d1"), rows, same,
                  weights_verdict("d1", "d2", verdict.tolerance), verdict, machine())
    assert "aten_kernels      avx2" in text and text.split("aten_kernels")[1].splitlines()[0].endswith("*")
    assert "rule: metrics within 5%, because the machines compute differently (aten_kernels avx2 vs avx512)" in text
    assert "verdict: REPRODUCED (metrics within 5%)" in text and "as expected when the machines differ" in text


@pytest.mark.parametrize(("flags", "torch_says", "cap", "expected"), [
    (AVX512_BF16, True, None, True),
    (AVX512_BF16, True, "AVX512_CORE", False),  # numerics.cpu_kernels avx512 caps oneDNN below its bf16 kernels
    (AVX512_BF16, True, "AVX2", False),  # the offline profile's pin: fp32 bits, whatever the CPU
    (AVX512_BF16, False, None, False),  # torch does not see it (an old torch, another architecture)
    (AVX2_ONLY, False, None, False),
])
def test_native_bf16_needs_the_cpu_and_the_kernels_in_use(monkeypatch, flags, torch_says, cap, expected):
    import torch

    monkeypatch.setattr(fp, "cpu_info", lambda: {"model": "x", "vendor": "v", "flags": " ".join(sorted(flags))})
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: torch_says, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert fp.native_bf16() is expected
