"""What machine a measurement came from: CPU and flags, cores, RAM, GPU, OS, library versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import psutil

from effdiff.profiling import is_jetson


def _cpu() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    wanted = {
        "avx2": "avx2",
        "avx512f": "avx512",
        "avx512_vnni": "avx512_vnni",
        "avx_vnni": "avx_vnni",
        "amx_int8": "amx_int8",
        "f16c": "f16c",
        "fma": "fma",
    }
    return {
        "model": model,
        "flags": sorted(name for flag, name in wanted.items() if flag in flags),
        "cores_logical": psutil.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def _gpu() -> list[dict[str, Any]]:
    """Through NVML when nvidia-ml-py is installed; else nvidia-smi; else none."""
    try:
        import pynvml

        pynvml.nvmlInit()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            out.append(
                {
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "memory_gib": round(pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30, 2),
                    "driver": str(pynvml.nvmlSystemGetDriverVersion()),
                }
            )
        return out
    except Exception:  # no NVML library, no driver, or no GPU: all mean "no NVIDIA GPU here"
        pass
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in proc.stdout.strip().splitlines():
        name, mem, driver = (p.strip() for p in line.split(","))
        gpus.append({"name": name, "memory_gib": round(float(mem) / 1024, 2), "driver": driver})
    return gpus


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_profile(providers: list[str] | None = None) -> dict[str, Any]:
    from effdiff.runtime.backends.ort import available_providers

    return {
        "cpu": _cpu(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": _gpu(),
        "jetson": is_jetson(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {
            p: _version(p)
            for p in (
                "effdiff",
                "onnxruntime",
                "onnxruntime-gpu",
                "tensorrt",
                "numpy",
                "torch",
                "diffusers",
                "DeepCache",
            )
        },
        "execution_providers": providers or available_providers(),
    }


def describe(profile: dict[str, Any]) -> str:
    """One line for report headers."""
    cpu = profile["cpu"]
    gpu = (
        "; ".join(f"{g['name']} {g['memory_gib']} GiB (driver {g['driver']})" for g in profile["gpus"])
        or "no GPU"
    )
    return (
        f"{cpu['model']} ({', '.join(cpu['flags']) or 'no AVX2'}), {cpu['affinity'] or cpu['cores_logical']} "
        f"cores, {profile['ram_gib']} GiB RAM, {gpu}, {profile['os']}, onnxruntime "
        f"{profile['versions']['onnxruntime'] or profile['versions']['onnxruntime-gpu']}"
    )
