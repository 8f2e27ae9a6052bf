"""torchvision's vit_b_16 (random weights) pruned to 0.70 with attention: the sparsity reached and the time.

Before nn.MultiheadAttention was pruned, every attention module was skipped and the model ended at 0.468 of its
weights. Run: ``OMP_NUM_THREADS=1 python benchmarks/vit_attention.py`` (one thread; minutes).
"""

import time
import warnings

import torch
import torchvision

from lightning_lobs import prune_model


def main() -> None:
    torch.manual_seed(0)
    m = torchvision.models.vit_b_16()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 224, 224, generator=g) for _ in range(2)]
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        r = prune_model(m, batches, 0.70, method="fast", allocation="uniform")
    dt = time.perf_counter() - t
    ws = {}
    for mod in m.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            ws[id(mod.weight)] = mod.weight
        if isinstance(mod, torch.nn.MultiheadAttention):
            ws[id(mod.in_proj_weight)] = mod.in_proj_weight
    z = sum(int((w == 0).sum()) for w in ws.values())
    n = sum(w.numel() for w in ws.values())
    print(f"seconds {dt:.1f} calib {r.calibration_seconds:.1f} solve {r.solve_seconds:.1f}")
    print(
        f"layers {len(r.layers)} pruned-layer sparsity {r.sparsity:.4f} model_sparsity {r.model_sparsity:.4f} "
        f"linear+conv+attn {z / n:.4f} skipped {list(r.skipped)}"
    )
    print([str(w.message)[:150] for w in rec])


if __name__ == "__main__":
    main()
