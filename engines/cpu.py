"""The CPU features that decide which integer kernels ONNX Runtime (MLAS) runs on this machine.

MLAS picks its uint8 x int8 matrix kernels by instruction set: AVX-512 VNNI, AVX-VNNI and AMX
accumulate products exactly in int32, while plain AVX2 and AVX-512 (without VNNI) first add pairs
of u8 x s8 products in int16 with saturation (vpmaddubsw). A result that is right on one machine
can therefore be wrong on another; logs and unit status name the features seen so such a
difference can be traced to the CPU.

The features are read as the process sees them: MLAS asks the CPU (CPUID on x86, the kernel's
hardware capabilities on ARM), and so does numpy's runtime dispatch, whose answer is used here.
`/proc/cpuinfo` alone can differ from that: under an emulator (qemu-user) it still describes the
host. It only adds the features numpy does not name (AVX-VNNI, AMX, int8 matrix multiply), and
only where it agrees with numpy on the rest, i.e. describes the same CPU.
"""

from __future__ import annotations

from pathlib import Path

# x86 flags as Linux spells them in /proc/cpuinfo: what MLAS dispatches its integer kernels on.
X86_FEATURES = frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"})
# ARM (aarch64) features from the `Features` line: dot products and int8 matrix multiply.
ARM_FEATURES = frozenset({"asimd", "asimddp", "i8mm", "sve", "sve2", "svei8mm"})
# numpy's names (numpy._core._multiarray_umath.__cpu_features__) for the features it detects.
_NUMPY_NAMES = {
    "AVX2": "avx2",
    "AVX512F": "avx512f",
    "AVX512BW": "avx512bw",
    "AVX512VNNI": "avx512_vnni",
    "ASIMD": "asimd",
    "ASIMDDP": "asimddp",
    "SVE": "sve",
}


def cpu_features(cpuinfo: Path | str | None = None) -> list[str]:
    """Sorted names of the integer-kernel features (X86_FEATURES, ARM_FEATURES) of this process's
    CPU, or, given `cpuinfo`, those that file names (the first `flags` or `Features` line).

    An empty list where nothing can be read (not Linux, an old numpy), since callers only log and
    report these.
    """
    if cpuinfo is not None:
        return _cpuinfo_features(cpuinfo)
    listed = _cpuinfo_features("/proc/cpuinfo")
    seen = _runtime_features()
    if seen is None:
        return listed
    judged = set(_NUMPY_NAMES.values())
    same_cpu = {f for f in listed if f in judged} == seen
    return sorted(seen | ({f for f in listed if f not in judged} if same_cpu else set()))


def _cpuinfo_features(cpuinfo: Path | str) -> list[str]:
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return sorted(set(value.split()) & (X86_FEATURES | ARM_FEATURES))
    return []


def _runtime_features() -> set[str] | None:
    """The features numpy's runtime dispatch found (CPUID / hardware capabilities), None when
    this numpy does not say."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as found
    except ImportError:
        try:
            # numpy 1.x: the same name, before numpy 2 moved its core to numpy._core.
            from numpy.core._multiarray_umath import __cpu_features__ as found  # type: ignore[no-redef]
        except ImportError:
            return None
    return {ours for name, ours in _NUMPY_NAMES.items() if found.get(name)}
