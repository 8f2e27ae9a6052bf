"""Small helpers shared by benchmarks/layers.py, scale.py and ddp_scale.py (not part of the package)."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLES = ROOT / "examples"  # the demo data and models (examples/mnist_data.py) are not part of the package
for _path in (ROOT, EXAMPLES):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def loadavg() -> str:
    """The 1/5/15-minute load averages (what `uptime` prints)."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> Dict[str, Any]:
    import pytorch_lightning as pl
    import torchvision

    return {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pl.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg_at_start": loadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def peak_rss_gib(children: bool = False) -> float:
    """Peak resident set size of this process (or of its waited-for children) in GiB (ru_maxrss is KiB on Linux)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 2**20


def current_rss_gib(pid: Optional[int] = None) -> float:
    path = f"/proc/{pid or 'self'}/status"
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def mnist_images(size: int, split_seed: int = 0, limit: Optional[int] = None):
    """Real MNIST (examples/mnist_data.py load_mnist: normalised (N,1,28,28)) resized bilinearly to size x size
    and repeated to 3 channels; only the first ``limit`` train/test images when given (keeps memory small at 224x224).
    Returns (train_x, train_y, test_x, test_y, source)."""
    from mnist_data import load_mnist

    s = load_mnist(split_seed=split_seed)
    if limit is not None:
        s.train_x, s.train_y, s.test_x, s.test_y = s.train_x[:limit], s.train_y[:limit], s.test_x[:limit], s.test_y[:limit]

    def prep(x: torch.Tensor) -> torch.Tensor:
        if size != 28:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.repeat(1, 3, 1, 1).contiguous()

    return prep(s.train_x), s.train_y, prep(s.test_x), s.test_y, s.source


def gemm_gflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


class Stopwatch:
    """``with Stopwatch() as sw: ...`` -> sw.seconds, sw.load_before, sw.load_after."""

    def __enter__(self) -> "Stopwatch":
        self.load_before = loadavg()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.load_after = loadavg()
