"""What the benchmarks record of the machine they ran on, beside their figures."""

from __future__ import annotations

from pathlib import Path


def cpu() -> dict:
    """The CPU's name, family, model and widest vector instructions, from /proc/cpuinfo. Four kinds of 2-core
    machine have run these benchmarks, and three of them call themselves "AMD EPYC": only the family and model
    (Zen 3, 4 or 5) and AVX-512 tell them apart, and the engine's job takes three times as long on one as on
    another (docs/benchmarks.md)."""
    fields: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if not key.strip():
            break
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {"name": fields.get("model name"), "family": fields.get("cpu family"), "model": fields.get("model"),
            "avx512": "avx512f" in flags, "avx2": "avx2" in flags}
