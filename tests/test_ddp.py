"""Data-driven scores under DDP (two CPU processes, gloo): each rank scores its shard of the score batches and
the sums are all-reduced, so both ranks get the scores and masks of one process scoring every batch.

- ``test_sharded_scores_equal_single_process``: SNIP and GraSP on two ``torch.multiprocessing`` ranks vs one
  process (scores within float tolerance, masks identical, the same bits on both ranks), with an uneven shard
  (3 batches on 2 ranks) and an empty one (1 batch: rank 1 scores nothing and still joins the reduction).
- ``test_ddp_pipeline_scores_match_single_process``: the CLI under ``trainer=ddp_cpu`` (the process group is
  up at the prune stage because pretraining ran under DDP) vs the same config single-process on the dense
  model the DDP run trained (loaded with ``model.weights``: the dense cache keeps DDP and single-process
  models apart): identical masks, and the finetune stage's ``mask_sync`` says the ranks agreed before any
  broadcast.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from prunelab.pruning.allocation import GlobalAllocation
from prunelab.pruning.masks import MaskSet
from prunelab.pruning.scorers.grasp import GraSPScorer
from prunelab.pruning.scorers.sharding import score_group, shard
from prunelab.pruning.scorers.snip import SNIPScorer
from tests.test_cli import FAST, prunelab, results_files


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 2, 4, 4, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(n)]


def _scorers(num_batches: int):
    return {"snip": SNIPScorer(num_batches=num_batches),
            "grasp": GraSPScorer(num_batches=num_batches, temperature=2.0)}


def _score_all(num_batches: int) -> dict[str, dict[str, torch.Tensor]]:
    """Scores of every scorer, with 5 batches available of which the scorer takes ``num_batches``."""
    torch.set_num_threads(1)
    model = _net()
    masks = MaskSet.from_model(model)
    return {name: s.score(model, masks, _batches(5)) for name, s in _scorers(num_batches).items()}


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        res = {"group": score_group(), **{str(n): _score_all(n) for n in (1, 3, 4)}}
        torch.save(res, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_is_round_robin():
    assert shard(range(5), 0, 2) == [0, 2, 4] and shard(range(5), 1, 2) == [1, 3]
    assert shard(range(1), 1, 2) == [] and shard(range(3), 0, 1) == [0, 1, 2]
    assert score_group() == (0, 1)  # no process group in the test process: local scoring


@pytest.mark.slow
def test_sharded_scores_equal_single_process(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["group"] for r in ranks] == [(0, 2), (1, 2)]
    for n in (1, 3, 4):
        single = _score_all(n)
        for scorer, ref in single.items():
            r0, r1 = ranks[0][str(n)][scorer], ranks[1][str(n)][scorer]
            for name in ref:
                assert torch.equal(r0[name], r1[name]), (n, scorer, name)  # the same bits on every rank
                torch.testing.assert_close(r0[name], ref[name], rtol=1e-5, atol=1e-7,
                                           msg=f"{scorer}, {n} batches, {name}")
            masks = MaskSet.from_model(_net())
            got = GlobalAllocation().masks_from_scores(r0, masks, 0.7)
            want = GlobalAllocation().masks_from_scores(ref, masks, 0.7)
            assert got.digest() == want.digest(), (n, scorer)


def _prune_masks(run_dir) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "stages" / "prune.pt", map_location="cpu", weights_only=False)
    return MaskSet.from_state_dict(state["masks"]).state_dict()


@pytest.mark.slow
def test_ddp_pipeline_scores_match_single_process(tmp_path):
    args = [*FAST, "logger=none", "method=snip", "prune.score_batches=3", "prune.sparsity=0.8"]
    out = prunelab(tmp_path, *args, "trainer=ddp_cpu", "trainer.devices=2", timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    (ddp_file,) = results_files(tmp_path)
    ddp_dense = Path(json.loads(ddp_file.read_text())["stages"]["pretrain"]["dir"]) / "model.pt"
    # single process on the weights the DDP run pretrained
    out = prunelab(tmp_path, *args, f"+model.weights={ddp_dense}", "pretrain.epochs=0", timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    (single_file,) = [f for f in results_files(tmp_path) if f != ddp_file]
    ddp, single = (json.loads(f.read_text()) for f in (ddp_file, single_file))
    single_dense = torch.load(Path(single["stages"]["pretrain"]["dir"]) / "model.pt", weights_only=True)
    assert all(torch.equal(v, single_dense[k]) for k, v in torch.load(ddp_dense, weights_only=True).items())
    assert ddp["stages"]["prune"]["target_info"]["score_world_size"] == 2  # scored in shards, reduced
    assert single["stages"]["prune"]["target_info"]["score_world_size"] == 1
    sync = ddp["stages"]["finetune"]["mask_sync"]
    assert sync["world_size"] == 2 and sync["identical_before_sync"] is True
    assert len(set(sync["digests"])) == 1

    m_ddp, m_single = _prune_masks(ddp_file.parent), _prune_masks(single_file.parent)
    assert m_ddp.keys() == m_single.keys()
    differing = sum(int((m_ddp[k] != m_single[k]).sum()) for k in m_ddp)
    assert differing == 0, f"{differing} mask entries differ between DDP and single-process scoring"
    assert ddp["final"]["sparsity_direct"] == pytest.approx(single["final"]["sparsity_direct"], abs=1e-9)
