"""CSR against dense for a GPT-2-small ``mlp.c_fc`` ``Conv1D`` (768 -> 3072) under ``plan_sparse_inference``.

Run: ``OMP_NUM_THREADS=1 python benchmarks/conv1d_inference.py`` (random weights pruned at random to 50% and 90%;
batch 1 and 256; 20 timed calls after 3 warm-up calls, median).
"""

import torch
import transformers

from lightning_lobs.export import plan_sparse_inference


def main() -> None:
    torch.manual_seed(0)
    for sp in (0.5, 0.9):
        layer = transformers.pytorch_utils.Conv1D(3072, 768)  # GPT-2 small's mlp.c_fc: in 768, out 3072
        with torch.no_grad():
            layer.weight[torch.rand(layer.weight.shape) < sp] = 0
        m = torch.nn.Sequential(layer)
        for b in (1, 256):
            p = plan_sparse_inference(m, batch_size=b, repeats=20, warmup=3)["0"]
            print(
                f"sparsity {sp} batch {b}: dense {p.dense_ms:.3f} ms, csr {p.sparse_ms['csr']:.3f} ms -> {p.kernel} ({p.reason})"
            )


if __name__ == "__main__":
    main()
