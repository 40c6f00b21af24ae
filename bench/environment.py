"""What a result was measured on: device, driver, library versions, commit, CPU."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _run(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def detect_device() -> torch.device:
    """CUDA when a GPU is visible, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_label(device: torch.device) -> str:
    """A file-name-safe device name: ``cpu`` or the GPU's name, e.g. ``nvidia-h100-80gb-hbm3``."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> dict:
    """The checked-out commit and whether the working tree differs from it; in a copy without
    ``.git`` (a lent GPU machine gets the working tree only) the commit ``$FASTRNN_COMMIT`` names."""
    commit = _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    if commit is None and os.environ.get("FASTRNN_COMMIT"):
        return {"commit": os.environ["FASTRNN_COMMIT"], "dirty": None, "from": "FASTRNN_COMMIT"}
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def nvidia_smi() -> dict | None:
    """Name, driver and memory of each GPU from ``nvidia-smi`` (None without it)."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if not out:
        return None
    gpus = []
    for line in out.splitlines():
        name, driver, memory = (part.strip() for part in line.split(",", 2))
        gpus.append({"name": name, "driver": driver, "memory": memory})
    return {"gpus": gpus, "driver": gpus[0]["driver"] if gpus else None}


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other work on the machine skews CPU timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def calm_threads() -> str | None:
    """Run torch on one CPU thread when the machine is already loaded (1-minute load average at
    least the core count): oversubscribed OpenMP threads stall at every barrier and CPU timings
    turn to noise. Returns a note when it changed anything."""
    load = load_average()
    cores = os.cpu_count() or 1
    if load and load[0] >= cores and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
        return (f"torch threads: 1 (load average {load[0]:.1f} on {cores} cores: multi-threaded timings would "
                "be dominated by other work; pass --threads N to override)")
    return None


def describe(device: torch.device) -> dict:
    """Everything recorded with a result file about where and with what it was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_label(device),
        "device_type": device.type,
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "driver": None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "git": git_commit(),
        "fastrnn_backend_env": os.environ.get("FASTRNN_BACKEND"),
        "tf32": {
            "matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn": bool(torch.backends.cudnn.allow_tf32),
        },
    }
    if device.type == "cuda":
        smi = nvidia_smi()
        info["nvidia_smi"] = smi
        info["driver"] = smi["driver"] if smi else None
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_bytes"] = props.total_memory
        info["compute_capability"] = f"{props.major}.{props.minor}"
    return info
