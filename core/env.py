"""Where treeopt's bundled data lives, the library versions a run records, and whether the hub answers."""

from __future__ import annotations

import os
import platform
from importlib import metadata, resources
from pathlib import Path

DATA_DIR = Path(str(resources.files("treeopt") / "data"))  # treeopt/data: the shipped heads and prompts
PACKAGES = ("treeopt", "torch", "transformers", "accelerate", "numpy", "pandas", "networkx", "matplotlib",
            "typer", "datasets")


def versions() -> dict[str, str]:
    """Python's and every key package's version, for the records a run writes."""
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc), None where the system does not say."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails at once instead of after minutes of retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
