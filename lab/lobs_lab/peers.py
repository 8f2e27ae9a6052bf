"""The peers' own pruning code (SparseGPT, ALPS), loaded at run time, and a block-by-block driver for it.

Nothing of the peers is copied into this repository: their files are read from the fetched git snapshots (bare git
directories, ``git --git-dir=REPO show HEAD:file``) and executed as modules, with the smallest patches that let them
run on a CPU:

* SparseGPT (IST-DASLab/sparsegpt): ``sparsegpt.py`` and the ``quant.py`` it star-imports; ``torch.cuda.synchronize()``
  dropped (it needs a GPU driver; nothing else of it does). Its ``SparseGPT`` class already handles
  ``transformers.Conv1D`` (GPT-2's layers, stored transposed).
* ALPS (mazumder-lab/ALPS): ``alps.py``; its hard-coded ``'cuda:0'`` replaced by ``'cpu'``, its
  ``torch.cuda.synchronize()`` dropped. Its ``ALPS_prune`` class handles ``transformers.Conv1D`` too.

The driver (:func:`prune_blocks`) is OURS, written after the description of SparseGPT's ``opt.py``
(``opt_sequential``; ALPS's ``opt.py`` drives its solver the same way): catch the calibration inputs of block 0
(one forward pass stopped there), then per block: forward hooks on its prunable layers feeding ``add_batch``, run the
block on its inputs, prune every hooked layer (``fasterprune`` / ``ALPS_admm``), run the block again on the pruned
weights to produce the next block's inputs. It is adapted to GPT-2 (``transformer.h`` blocks, ``transformers.Conv1D``
layers next to ``nn.Linear``; their ``find_layers`` lists Linear and Conv2d only), keeps the calibration batches as
they come (their ``opt.py`` runs one sequence at a time) and passes every argument the model gives block 0 (args and
kwargs, e.g. the attention mask and position ids) on to every block. The solvers are theirs, called with their
defaults as their ``opt.py`` calls them (SparseGPT: blocksize 128, 1% damping; ALPS: ``rho=0.1``).
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

SPARSEGPT_REPO = "/work/.mirror/IST-DASLab+sparsegpt/repo"
ALPS_REPO = "/work/.mirror/mazumder-lab+ALPS/repo"

#: An N:M pattern as ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs.
Pattern = tuple[int, int]

# --------------------------------------------------------------------------- loading the peers' files


def git_show(repo: str, path: str) -> str:
    """A file of the snapshot's HEAD commit (the mirrors are bare git directories, no work tree)."""
    return subprocess.run(
        ["git", "--git-dir", repo, "show", f"HEAD:{path}"], check=True, capture_output=True, text=True
    ).stdout


def repo_available(repo: str) -> bool:
    """Whether ``repo`` is a git directory whose HEAD can be read."""
    if not Path(repo).exists():
        return False
    proc = subprocess.run(["git", "--git-dir", repo, "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.returncode == 0


def repo_commit(repo: str) -> str:
    """The snapshot's HEAD commit (recorded with the results)."""
    return subprocess.run(
        ["git", "--git-dir", repo, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def load_module(name: str, source: str) -> types.ModuleType:
    """Execute ``source`` as a module registered under ``name`` (their star-imports find each other by name)."""
    module = types.ModuleType(name)
    module.__file__ = f"<{name} from git>"
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - the peer's code, run as-is
    return module


def load_sparsegpt(repo: str = SPARSEGPT_REPO) -> types.ModuleType:
    """SparseGPT's ``sparsegpt.py`` (with its ``quant.py``), ``torch.cuda.synchronize()`` dropped."""
    load_module("quant", git_show(repo, "quant.py"))
    source = git_show(repo, "sparsegpt.py").replace("torch.cuda.synchronize()", "None")
    return load_module("sparsegpt_peer", source)


def load_alps(repo: str = ALPS_REPO) -> types.ModuleType:
    """ALPS's ``alps.py`` with ``'cuda:0'`` -> ``'cpu'`` and ``torch.cuda.synchronize()`` dropped."""
    source = git_show(repo, "alps.py")
    source = source.replace("'cuda:0'", "'cpu'").replace('"cuda:0"', '"cpu"')
    return load_module("alps_peer", source.replace("torch.cuda.synchronize()", "None"))


# --------------------------------------------------------------------------- the block driver


class _StopAtBlock(Exception):
    """Raised by the pre-hook on block 0 once its inputs are caught (their ``Catcher`` raises ValueError)."""


def prunable_layers(block: nn.Module) -> dict[str, nn.Module]:
    """The block's ``nn.Linear`` and ``transformers.Conv1D`` layers by name (their ``find_layers`` adapted)."""
    kinds: tuple[type, ...] = (nn.Linear,)
    with contextlib.suppress(ImportError):
        from transformers.pytorch_utils import Conv1D

        kinds = (nn.Linear, Conv1D)
    return {n: m for n, m in block.named_modules() if isinstance(m, kinds)}


def catch_block_inputs(
    model: nn.Module, first_block: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any]
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Every batch's positional and keyword arguments to ``first_block``, from one forward pass stopped there."""
    caught: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        caught.append((args, kwargs))
        raise _StopAtBlock

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_StopAtBlock):
                forward(model, batch)
    finally:
        handle.remove()
    return caught


def run_block(block: nn.Module, hidden: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """The block's output hidden states on ``hidden`` with the other caught arguments (a tuple output: its first)."""
    out = block(hidden, *args[1:], **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class PeerSolver:
    """How the driver uses a peer's per-layer class: ``make(layer)`` -> an object with ``add_batch(inp, out)``,
    ``prune(obj)`` prunes the layer in place."""

    name: str
    make: Callable[[nn.Module], Any]
    prune: Callable[[Any], None]


@dataclass
class BlockRun:
    """What :func:`prune_blocks` did: the layers pruned (qualified within the block list), seconds per phase."""

    layers: list[str] = field(default_factory=list)
    catch_seconds: float = 0.0
    calibrate_seconds: float = 0.0
    solve_seconds: float = 0.0
    forward_seconds: float = 0.0


def _calibrate_block(block: nn.Module, solver: PeerSolver, inputs: list[Tensor], caught: list[Any]) -> dict[str, Any]:
    """Hooks on the block's layers feeding the peer's ``add_batch``, one run of the block per batch."""
    layers = prunable_layers(block)
    pruners = {name: solver.make(layer) for name, layer in layers.items()}
    handles = []
    for name, layer in layers.items():

        def hook(_: nn.Module, inp: tuple[Tensor, ...], out: Tensor, name: str = name) -> None:
            pruners[name].add_batch(inp[0].data, out.data)

        handles.append(layer.register_forward_hook(hook))
    try:
        for hidden, (args, kwargs) in zip(inputs, caught):
            run_block(block, hidden, args, kwargs)
    finally:
        for h in handles:
            h.remove()
    return pruners


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Any:
    """``config.use_cache = False`` on every transformers config inside ``model`` while the driver runs (their
    ``opt.py`` does the same): a key/value cache caught with block 0's inputs would grow on every re-run."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    saved = {k: getattr(c, "use_cache", None) for k, c in configs.items()}
    for c in configs.values():
        if hasattr(c, "use_cache"):
            c.use_cache = False
    try:
        yield
    finally:
        for k, c in configs.items():
            if saved[k] is not None:
                c.use_cache = saved[k]


@torch.no_grad()
def prune_blocks(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    batches: Iterable[Any],
    solver: PeerSolver,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> BlockRun:
    """Prune every ``nn.Linear`` / ``Conv1D`` inside ``blocks`` with a peer's solver, block by block (see the module
    docstring): one forward pass up to block 0, then per block calibrate, prune, re-run. ``forward(model, batch)``
    defaults to ``model(batch)``. The model is put in eval mode for the run and restored after."""
    forward = forward or (lambda m, b: m(b))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    run = BlockRun()
    try:
        with _no_kv_cache(model):
            t0 = time.perf_counter()
            caught = catch_block_inputs(model, blocks[0], batches, forward)
            run.catch_seconds = time.perf_counter() - t0
            inputs = [args[0] for args, _ in caught]
            for i, block in enumerate(blocks):
                inputs = _prune_one_block(i, block, solver, inputs, caught, run)
                if progress is not None:
                    progress(f"{solver.name}: block {i + 1}/{len(blocks)} pruned")
    finally:
        for m, mode in modes.items():
            m.training = mode
    return run


def _prune_one_block(
    i: int, block: nn.Module, solver: PeerSolver, inputs: list[Tensor], caught: list[Any], run: BlockRun
) -> list[Tensor]:
    """Calibrate, prune and re-run block ``i``; returns the next block's inputs (their ``opt.py``'s loop body)."""
    t0 = time.perf_counter()
    pruners = _calibrate_block(block, solver, inputs, caught)
    t1 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # their solvers print per-layer timings and errors
        for name, pruner in pruners.items():
            solver.prune(pruner)
            run.layers.append(f"{i}.{name}")
    t2 = time.perf_counter()
    del pruners
    outputs = [run_block(block, h, a, k) for h, (a, k) in zip(inputs, caught)]
    run.calibrate_seconds += t1 - t0
    run.solve_seconds += t2 - t1
    run.forward_seconds += time.perf_counter() - t2
    return outputs


# --------------------------------------------------------------------------- the two peers as PeerSolvers


def sparsegpt_solver(module: types.ModuleType, sparsity: float | None, pattern: Pattern | None) -> PeerSolver:
    """SparseGPT's ``SparseGPT`` class: ``add_batch``, then ``fasterprune`` with their ``opt.py``'s defaults
    (blocksize 128, percdamp 0.01; with an N:M pattern ``prunen``/``prunem``), then ``free``."""
    n, m = pattern or (0, 0)

    def prune(p: Any) -> None:
        p.fasterprune(sparsity if sparsity is not None else 1 - n / m, prunen=n, prunem=m, blocksize=128, percdamp=0.01)
        p.free()

    return PeerSolver("sparsegpt", module.SparseGPT, prune)


def alps_solver(module: types.ModuleType, sparsity: float | None, pattern: Pattern | None) -> PeerSolver:
    """ALPS's ``ALPS_prune`` class: ``add_batch``, then ``ALPS_admm`` with their ``opt.py``'s ``rho=0.1`` and their
    other defaults. ``nsamples``/``seqlen`` of its constructor only set an unused attribute."""
    n, m = pattern or (0, 0)

    def prune(p: Any) -> None:
        p.ALPS_admm(sp=sparsity if sparsity is not None else 1 - n / m, nm_n=n, nm_m=m, rho=0.1)

    return PeerSolver("alps", lambda layer: module.ALPS_prune(layer, nsamples=1, seqlen=1), prune)


def gpt2_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``transformer.h`` block list of a ``GPT2LMHeadModel`` (also when wrapped, e.g. in a LightningModule)."""
    for name, module in model.named_modules():
        if name == "transformer.h" or name.endswith(".transformer.h"):
            return module  # type: ignore[return-value]
    raise ValueError("no 'transformer.h' block list found: pass a GPT2LMHeadModel (or a module holding one).")
