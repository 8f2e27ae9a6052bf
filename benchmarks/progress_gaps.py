"""Gaps between progress events and ETA quality of real prunes, one thread.
Run: ``OMP_NUM_THREADS=1 python benchmarks/progress_gaps.py linear`` (one nn.Linear(1024, 512), 4 batches of 256,
sparsity 0.5, ``exact``) or ``... resnet`` (torchvision resnet18, random weights, 10 classes, 4 batches of
16x3x64x64, sparsity 0.5, the default method). Prints the longest gap between two progress events (from the start of
the prune to its end) and, per phase, the worst ratio of the ETA to the real time left after the first tenth of the
phase while more than 1 s is left."""

import sys
import time

import torch
from torch import nn

from lightning_lobs import prune_model
from lightning_lobs.progress import PhaseProgress

torch.set_num_threads(1)
begins = []
orig = PhaseProgress.begin


def begin(self, phase, costs):
    if self.fn is not None:
        begins.append((time.perf_counter(), phase))
    return orig(self, phase, costs)


PhaseProgress.begin = begin
torch.manual_seed(0)
if sys.argv[1] == "linear":
    model = nn.Sequential(nn.Linear(1024, 512))
    data = [torch.randn(256, 1024) for _ in range(4)]
    kw = dict(sparsity=0.5, method="exact")
else:
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    data = [torch.randn(16, 3, 64, 64) for _ in range(4)]
    kw = dict(sparsity=0.5)
ev = []
t0 = time.perf_counter()
rep = prune_model(model, data, progress=lambda e: ev.append((time.perf_counter(), e)), prune_head=True, **kw)
t1 = time.perf_counter()
times = [t0] + [t for t, _ in ev] + [t1]
gaps = [b - a for a, b in zip(times, times[1:])]
i = max(range(len(gaps)), key=gaps.__getitem__)
print(
    f"{sys.argv[1]}: {t1 - t0:.1f} s, {len(ev)} events, max gap {gaps[i]:.2f} s, before: "
    f"{ev[i][1].describe() if i < len(ev) else 'end'}"
)
ends = [b for b, _ in begins[1:]] + [t1]
for (tb, ph), _end in zip(begins, ends):
    last = max(t for t, e in ev if e.phase == ph)
    worst, at = 1.0, None
    for t, e in ev:
        if e.phase == ph and t - tb >= 0.1 * (last - tb) and last - t > 1.0 and e.eta is not None:
            r = e.eta / (last - t)
            w = max(r, 1 / r) if r > 0 else float("inf")
            if w > worst:
                worst, at = w, (round(t - tb, 1), round(last - t, 1), e.describe())
    print(
        f"  {ph}: {last - tb:.1f} s; worst ETA / real time left, after a tenth of the phase (> 1 s left): {worst:.2f} at {at}"
    )
print(
    "  secs of the first layers:",
    {n: round(l.seconds, 2) for n, l in list(rep.layers.items())[:4]},
    "sum",
    round(sum(l.seconds for l in rep.layers.values()), 1),
    "solve_seconds",
    round(rep.solve_seconds, 1),
)
