"""The benchmark harness: machine and load records, timers, memory peaks, JSON and figure output, short training
loops, dense-weight caching. Shared by every script under examples/ and benchmarks/."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------- machine and load


def loadavg() -> str:
    """The 1/5/15-minute load averages (what `uptime` prints)."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def cpu_model() -> str:
    """The CPU's model name from ``lscpu`` (else ``platform.processor()``)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


#: Packages whose versions :func:`machine_info` records when the run has imported them.
_RECORDED_PACKAGES = ("pytorch_lightning", "lightning", "torchvision", "transformers", "torchmetrics")


def machine_info() -> dict[str, Any]:
    """CPU model and count, load averages, Python, torch threads, and the versions of the packages imported so far.

    Only packages already imported are recorded, so recording them never costs an import.
    """
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    for name in _RECORDED_PACKAGES:
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", "?")
    return info


def peak_rss_gib(children: bool = False) -> float:
    """Peak resident set size of this process (or of its waited-for children) in GiB (ru_maxrss is KiB on Linux)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 2**20


def current_rss_gib(pid: int | None = None) -> float:
    """Resident set size of ``pid`` (default: this process) in GiB, from ``/proc``; NaN where unreadable."""
    path = f"/proc/{pid or 'self'}/status"
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def gemm_gflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Measured GFLOP/s of an ``n x n`` matrix product (one warm-up): the machine's yardstick for solve timings."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


class Stopwatch:
    """``with Stopwatch() as sw: ...`` -> sw.seconds, sw.load_before, sw.load_after."""

    def __enter__(self) -> Stopwatch:
        self.load_before = loadavg()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.load_after = loadavg()


# --------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory while the ``with`` block runs, above the RSS at its start (sampled every 2 ms by a thread;
    torch ops release the GIL, so the sampler runs during them). Linux only (``/proc/self/statm``)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self.seconds = math.nan
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss_bytes()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak = max(self.peak, _rss_bytes())
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self._t0

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.start) / 2**20


# --------------------------------------------------------------------------- command lines, files, figures


def csv_list(kind: Callable[[str], Any], allow_empty: bool = False) -> Callable[[str], list[Any]]:
    """An argparse ``type``: a comma-separated list of ``kind`` values (empty only if ``allow_empty``)."""

    def parse(value: str) -> list[Any]:
        items = [kind(v) for v in value.split(",") if v.strip()]
        if not items and not allow_empty:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return items

    return parse


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (a temporary file renamed over ``path``), so a reader never sees half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def write_results(
    out: str,
    results: dict[str, Any],
    plot: Callable[[str, dict[str, Any]], None],
    table: Callable[[dict[str, Any]], str],
) -> None:
    """``<out>.json`` and ``<out>.png`` of an example's results, and its table on stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    plot(out + ".png", results)
    print(table(results))


@contextlib.contextmanager
def figure(path: str, ncols: int = 1, figsize: tuple[float, float] = (6.0, 4.0), dpi: int = 120) -> Iterator[Any]:
    """``with figure(path) as ax:`` draw on ``ax`` (a tuple of axes when ``ncols > 1``); saved to ``path`` on exit.

    matplotlib is imported here, with the file-only Agg backend, so that the scripts run on machines without a
    display and import it only when they plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, dpi=dpi)
    try:
        yield axes
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- training


def quiet_trainer(**kwargs: Any) -> Any:
    """A CPU ``pytorch_lightning.Trainer`` without logger, checkpoints, progress bar, summary or sanity check."""
    import pytorch_lightning as pl

    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=kwargs.pop("logger", False),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def fit_quietly(trainer: Any, module: Any, loader: Any) -> float:
    """``trainer.fit(module, loader)`` without the warning about ``num_workers=0`` (deliberate: the data are
    in-memory tensors); returns the seconds it took."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        trainer.fit(module, train_dataloaders=loader)
    return time.perf_counter() - t0


def train_epochs(model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int, batch: int, lr: float = 1e-3) -> None:
    """Plain Adam training on in-memory tensors: per epoch a permutation from a generator seeded once with ``seed``,
    minibatches of ``batch`` in that order, cross-entropy. Leaves the model in train mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def train_or_load(
    path: str | None, key: Mapping[str, Any], module: nn.Module, train: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Dense weights for ``module``: trained by ``train()`` (which returns what to record about the training), or
    loaded from ``path`` when it holds weights trained with the same ``key`` (every argument the training depends on).

    With ``path`` set, freshly trained weights are saved there, so the pruning part of a benchmark can be rerun
    without retraining. The returned record says which happened (``"dense_source"``)."""
    key = json.loads(json.dumps(dict(key), default=str))
    if path and os.path.exists(path):
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved.get("key") == key:
            module.load_state_dict(saved["state"])
            return {**saved["info"], "dense_source": f"loaded from {path}"}
        warnings.warn(
            f"dense_cache={path!r} was trained with other settings; training again and overwriting it", stacklevel=2
        )
    info = train()
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save({"key": key, "state": module.state_dict(), "info": info}, path)
    return {**info, "dense_source": "trained in this run"}
