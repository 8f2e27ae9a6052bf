"""What ``release_freed_memory`` (glibc's ``malloc_trim(0)``) costs inside a default prune (issue 19).

    OMP_NUM_THREADS=1 python benchmarks/release_cost.py            # random 2 x 768 GPT-2, one batch of 8 x 128
    OMP_NUM_THREADS=1 python benchmarks/release_cost.py --off      # the same, every call made a no-op

Every call the engine makes is timed (the function is wrapped where the engine imported it); printed: the number
of calls, their total, median and largest time, the prune's wall time and the process's peak RSS. One torch thread.
``--off``: the calls are counted but release nothing (the same prune without trimming; run it as its own process,
since peak RSS is per process).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import transformers

import lightning_lobs.engine.run as run_mod
import lightning_lobs.engine.sequential as sequential_mod
from lightning_lobs import prune_model, resources


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--rows", type=int, default=8, help="sequences of 128 tokens in the one calibration batch")
    p.add_argument("--off", action="store_true", help="count the calls but release nothing")
    args = p.parse_args()
    torch.set_num_threads(1)
    config = transformers.GPT2Config(n_layer=args.blocks, n_embd=args.width, n_head=args.width // 64, n_positions=128)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    batches = [torch.randint(0, config.vocab_size, (args.rows, 128))]
    times: list[float] = []

    def timed() -> bool:
        t = time.perf_counter()
        done = False if args.off else resources.release_freed_memory()
        times.append(time.perf_counter() - t)
        return done

    sequential_mod.release_freed_memory = timed
    run_mod.release_freed_memory = timed
    t0 = time.perf_counter()
    prune_model(model, batches, 0.5, forward_fn=lambda m, b: m(b).logits)
    wall = time.perf_counter() - t0
    ms = sorted(t * 1e3 for t in times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"{args.blocks} x {args.width}{' (off)' if args.off else ''}: {len(ms)} calls, total {sum(ms):.1f} ms, median {ms[len(ms) // 2]:.2f} ms, "
        f"max {ms[-1]:.2f} ms; prune {wall:.1f} s wall; peak RSS {peak:.2f} GiB"
    )


if __name__ == "__main__":
    main()
