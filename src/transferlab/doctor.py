"""``transferlab doctor``: is this machine ready to train, and what would a run use?

Each check is green (ready), yellow (works, with a cost or a missing extra) or red (a command
will fail), and a red one carries the fix. Nothing is downloaded, trained or written (write
permissions are probed with ``os.access``).
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transferlab.cache_admin import cache_info, human_bytes
from transferlab.config import DEFAULT_BACKBONE
from transferlab.provenance import package_version
from transferlab.system import available_cpus

__all__ = ["Check", "run_checks"]

GREEN, YELLOW, RED = "green", "yellow", "red"


@dataclass
class Check:
    name: str
    status: str  # green | yellow | red
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_checks(out_dir: str | os.PathLike = "runs", cache_dir: str | None = None) -> list[Check]:
    """Every check, in the order a user thinks about them."""
    return [
        _versions(),
        _cpus(),
        _accelerators(),
        _engines(),
        _cache(cache_dir),
        _weights(),
        _chromium(),
        _mlflow(),
        _writable("output folder", Path(out_dir), "pass --out to a folder you can write"),
    ]


def _versions() -> Check:
    import transferlab

    libs = {n: package_version(n) for n in ("torch", "torchvision", "timm", "lightning", "numpy")}
    missing = [n for n, v in libs.items() if v is None]
    detail = f"python {platform.python_version()}, transferlab {transferlab.__version__}, " + (
        ", ".join(f"{n} {v}" for n, v in libs.items() if v)
    )
    if missing:
        return Check("versions", RED, detail, f"pip install -r requirements.txt ({missing})")
    return Check("versions", GREEN, detail)


def _cpus() -> Check:
    import torch

    cpus, threads = available_cpus(), torch.get_num_threads()
    env = ", ".join(f"{v}={os.environ[v]}" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
                    if v in os.environ)  # fmt: skip
    detail = f"{cpus} usable of {os.cpu_count()} cores; torch threads {threads}" + (
        f" ({env})" if env else ""
    )
    if threads > cpus:
        return Check("cpu", YELLOW, detail + ": more threads than cores (oversubscribed)",
                     f"export OMP_NUM_THREADS={cpus}")  # fmt: skip
    return Check("cpu", GREEN, detail)


def _accelerators() -> Check:
    import torch

    if torch.cuda.is_available():
        devices = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(f"cuda:{i} {p.name} {p.total_memory / 2**30:.0f} GiB")
        return Check("accelerators", GREEN, "; ".join(devices) + " (fit: --accelerator gpu)")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return Check("accelerators", GREEN, "Apple MPS available (fit: --accelerator auto)")
    return Check(
        "accelerators", YELLOW,
        "none (CPU only): feature strategies are fine; fine-tuning and scratch CNNs are slow",
    )  # fmt: skip


def _engines() -> Check:
    from transferlab.runtime import _engine_chain, _importable

    have = {e: package_version(e) for e in ("openvino", "onnxruntime")}
    chain = [e for e in _engine_chain("auto") if e == "torch" or _importable(e)]
    detail = ", ".join(f"{e} {v or 'not installed'}" for e, v in have.items())
    detail += f"; fit --engine auto would use {chain[0]}"
    if chain[0] == "torch":
        return Check("engines", YELLOW, detail + " (slower frozen-feature extraction)")
    return Check("engines", GREEN, detail)


def _cache(cache_dir: str | None) -> Check:
    info = cache_info(cache_dir)
    detail = f"{info.root}: {human_bytes(info.bytes)} in {info.files} files"
    if not info.exists:
        detail = f"{info.root} (not created yet)"
    check = _writable("cache", Path(info.root), "set TRANSFERLAB_CACHE (or --cache-dir) to a "
                      "writable folder")  # fmt: skip
    return Check("cache", check.status, detail + ("" if check.status == GREEN else
                 f"; {check.detail}"), check.fix)  # fmt: skip


def _weights() -> Check:
    from transferlab.backbones.search import find_local, local_folders, weight_roots

    spec = DEFAULT_BACKBONE
    local = Path(spec.removeprefix("local-dir:")) if spec.startswith("local-dir:") else None
    found = local if local is not None and local.is_dir() else find_local(spec)
    names = sorted({f.name for f in local_folders()})
    where = ", ".join(str(r) for r in weight_roots()) or "no weights folder configured"
    if found is not None:
        return Check("offline weights", GREEN, f"default backbone {spec} at {found}; "
                     f"{len(names)} offline: {', '.join(names)}")  # fmt: skip
    return Check(
        "offline weights", YELLOW,
        f"default backbone {spec} not found offline (searched: {where})",
        "set TRANSFERLAB_WEIGHTS to a folder of timm weights, or let timm download once",
    )  # fmt: skip


def _chromium() -> Check:
    found = next((p for p in map(shutil.which, ("chromium", "chromium-browser",
                                                "google-chrome")) if p), None)  # fmt: skip
    if found:
        return Check("headless chromium", GREEN, f"{found} (report checks can run)")
    return Check("headless chromium", YELLOW, "not found: the browser test of report.html skips",
                 "apt-get install chromium (optional)")  # fmt: skip


def _mlflow() -> Check:
    version = package_version("mlflow")
    if version:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "./mlruns")
        return Check("tracking", GREEN, f"mlflow {version}; --track mlflow logs to {uri}")
    return Check("tracking", YELLOW, "mlflow not installed: --track mlflow unavailable",
                 "pip install mlflow-skinny (optional)")  # fmt: skip


def _writable(name: str, path: Path, fix: str) -> Check:
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent  # fit creates the missing folders under the first existing one
    if os.access(probe, os.W_OK | os.X_OK):
        return Check(name, GREEN, f"{path} writable")
    return Check(name, RED, f"{path}: {probe} is not writable", fix)


def has_red(checks: list[Check]) -> bool:
    return any(c.status == RED for c in checks)
