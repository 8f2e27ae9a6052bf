"""The paper's bound on a ``fully_shard`` (FSDP2) model: in a 1-rank gloo group in this process (quick), the same
bound as the unsharded model's; the 2-rank runs of ``tests/test_fsdp.py`` check it across ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_lobs import prune_model
from lightning_lobs.bounds import analyze_chain
from lightning_lobs.sharding import is_sharded
from ranks import needs_gloo

pytestmark = [pytest.mark.distributed, needs_gloo, pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-rank gloo group (file rendezvous: no port), destroyed afterwards."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _net(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 4))
    # BatchNorm (root's parameters, sharded) and an unpruned Linear on the chain: their factors read sharded weights
    return nn.Sequential(
        nn.Linear(12, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8)
    ).eval()


def _shard(net: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for m in net:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(net)


@pytest.mark.parametrize("kind", ["mlp", "bn"])
def test_bound_of_a_sharded_model_is_the_unsharded_one(one_rank_group, kind):
    batches = [torch.randn(32, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    plain, sharded = _net(kind), _net(kind)
    _shard(sharded)
    assert all(is_sharded(p) for p in sharded.parameters())
    # which layers are pruned: the mlp all (prune_head), the bn one the first and the middle, the last left dense
    kwargs = dict(prune_head=kind == "mlp", recalibrate_bn=False, allocation="uniform")
    ref = prune_model(plain, batches, 0.5, "exact", **kwargs)
    got = prune_model(sharded, batches, 0.5, "exact", **kwargs)
    assert ref.bound_note == "" and math.isfinite(ref.bound), ref.bound_note
    assert got.bound_note == "", got.bound_note
    # the same chain and norms; the layer errors agree to the float32 solve's rounding (the sharded forward's
    # activations are the same numbers, summed in the same order: in practice equal)
    assert got.bound == pytest.approx(ref.bound, rel=1e-5)
    assert got.bound_spectral == pytest.approx(ref.bound_spectral, rel=1e-5)
    chain = analyze_chain(sharded, list(got.layers))
    assert chain.is_chain and [link.name for link in chain.links] == list(ref.layers)


def test_fully_shard_layers_are_traced_as_leaves(one_rank_group):
    """Traced through, an FSDP2 layer reads its DTensor parameters and fx fails on FSDP's control flow; as a leaf
    it is the one call of its layer, as unsharded."""
    net = _net("mlp")
    _shard(net)
    info = analyze_chain(net, ["0", "2", "4"])
    assert info.is_chain, info.reason
    assert [link.op_factor for link in info.links] == [1.0, 1.0, 1.0]  # ReLU and Tanh: factor 1
