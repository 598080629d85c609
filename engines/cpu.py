"""The CPU features that decide which integer kernels ONNX Runtime (MLAS) runs on this machine.

MLAS picks its uint8 x int8 matrix kernels by instruction set: AVX-512 VNNI, AVX-VNNI and AMX
accumulate products exactly in int32, while plain AVX2 and AVX-512 (without VNNI) first add pairs
of u8 x s8 products in int16 with saturation (vpmaddubsw). A result that is right on one machine
can therefore be wrong on another; logs and unit status name the features seen so such a
difference can be traced to the CPU.
"""

from __future__ import annotations

from pathlib import Path

# x86 flags as Linux spells them in /proc/cpuinfo: what MLAS dispatches its integer kernels on.
X86_FEATURES = frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"})
# ARM (aarch64) features from the `Features` line: dot products and int8 matrix multiply.
ARM_FEATURES = frozenset({"asimd", "asimddp", "i8mm", "sve", "sve2", "svei8mm"})


def cpu_features(cpuinfo: Path | str = "/proc/cpuinfo") -> list[str]:
    """Sorted names of the integer-kernel features this CPU reports (X86_FEATURES, ARM_FEATURES).

    Read from the first `flags` (x86) or `Features` (ARM) line of `cpuinfo`; an empty list where
    the file is missing or unreadable (not Linux), since callers only log and report these.
    """
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return sorted(set(value.split()) & (X86_FEATURES | ARM_FEATURES))
    return []
