"""Two causal LMs under DDP and FSDP2 (``fully_shard``) in two gloo processes on the CPU: the ranks agree
on the teacher, and after 3 steps the parameters equal a single-process run on the concatenated batch."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TORCH

STEPS, BATCH, LENGTH = 3, 4, 9


def _members():
    sys.path.insert(0, os.path.dirname(__file__))
    from test_lm import TinyLM

    torch.manual_seed(0)
    return [TinyLM(vocab=13, width=8), TinyLM(vocab=13, width=12)]


def _batches():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 13, (2 * BATCH, LENGTH), generator=g) for _ in range(STEPS)]


def _group(models, granularity):
    from competitive import KL, CompetitiveGroup

    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in models]
    chunk_rows = 3 if granularity.endswith("-chunked") else 0  # the step math over chunks of 3 tokens
    return CompetitiveGroup(
        models, optimizers, class_dim=-1, shift_targets=True, granularity=granularity.split("-")[0],
        terms=[KL(divergence="jsd")], warmup_steps=0, keep_cpu_memory=False, chunk_rows=chunk_rows,
    )  # fmt: skip


def _worker(rank, world, out, wrap, granularity):
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    torch.set_num_threads(1)
    models = _members()
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        models = [DDP(m) for m in models]
    else:
        from torch.distributed.fsdp import fully_shard

        for m in models:
            fully_shard(m)
    group = _group(models, granularity)
    teachers = []
    for ids in _batches():
        shard = ids[rank * BATCH : (rank + 1) * BATCH]
        teachers.append(group.step((shard, shard)).teacher)
    params = []
    for m in models:
        for p in m.parameters():
            params.append((p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten())
    torch.save({"teachers": teachers, "params": torch.cat(params)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads may abort at interpreter exit, after the results are saved


@pytest.mark.parametrize("granularity", ["batch", "position", "position-chunked"])
@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path, wrap, granularity):
    if wrap == "fsdp2" and TORCH < (2, 11):  # 2.6: no torch.Stream.record_event; 2.7.1: other parameters (by 0.05)
        pytest.skip(f"FSDP2 on gloo matches one process from torch 2.11 on; this is torch {torch.__version__}")
    mp.start_processes(_worker, args=(2, str(tmp_path), wrap, granularity), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    models = _members()
    group = _group(models, granularity)
    single = [group.step((ids, ids)).teacher for ids in _batches()]
    expected = torch.cat([p.detach().flatten() for m in models for p in m.parameters()])
    torch.testing.assert_close(r0["params"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(r1["params"], expected, rtol=0, atol=1e-5)
    if granularity == "batch":  # one teacher for the whole batch, agreed by the ranks
        assert [int(t) for t in r0["teachers"]] == [int(t) for t in r1["teachers"]] == [int(t) for t in single]
    else:  # a teacher per token: each rank's half of the whole batch's map
        for a, b, whole in zip(r0["teachers"], r1["teachers"], single):
            assert torch.equal(torch.cat([a, b]), whole)
