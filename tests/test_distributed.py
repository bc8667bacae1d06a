"""Two gloo processes on the CPU: the ranks agree on the teacher and the members stay identical."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 8


def _exit():
    # leave without running C++ static destructors: at interpreter exit gloo's threads sometimes end in
    # std::terminate (SIGABRT, "terminate called without an active exception"), after the results are saved
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank, world, out, compile_loss):
    sys.path.insert(0, os.path.dirname(__file__))
    from reference import tiny_cnn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from competitive import CompetitiveGroup

    # a file store in the test's own folder: no TCP port to race for
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    torch.set_num_threads(1)
    members = [DDP(tiny_cnn(width=4, seed=i, dtype=torch.float32)) for i in range(2)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in members]
    group = CompetitiveGroup(members, optimizers, feature_hooks=["1", "1"], compile=compile_loss)
    teachers, local_best = [], []
    for step in range(STEPS):
        # every rank sees its own shard; rank 1's shard is made harder for member 0 at odd steps
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
        result = group.step((x, y))
        teachers.append(result.teacher.item())
        local_best.append(int(result.ce.argmin()))
    params = torch.cat([p.detach().flatten() for m in members for p in m.parameters()])
    torch.save({"teachers": teachers, "local_best": local_best, "params": params}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    _exit()


# the functional all-reduce traces into the step graph; aot_eager builds it without inductor's C++ build
@pytest.mark.parametrize("compile_loss", [False, {"backend": "aot_eager"}])
def test_ddp_ranks_agree_on_the_teacher_and_parameters(tmp_path, compile_loss):
    mp.start_processes(_worker, args=(2, str(tmp_path), compile_loss), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["teachers"] == r1["teachers"]
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)
    # the shards differ, so the ranks' local winners differ at some step: the agreement is not free
    assert r0["local_best"] != r1["local_best"]
    assert len(set(r0["teachers"])) > 1


def _hetero_worker(rank, world, out):
    sys.path.insert(0, os.path.dirname(__file__))
    from reference import tiny_cnn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from competitive import CompetitiveGroup

    # a file store in the test's own folder: no TCP port to race for
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    torch.set_num_threads(1)
    members = [DDP(tiny_cnn(width=w, seed=i, dtype=torch.float32)) for i, w in enumerate((4, 6))]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in members]
    torch.manual_seed(1234 + rank)  # the group's parts start from different draws on each rank
    group = CompetitiveGroup(
        members,
        optimizers,
        feature_hooks=["1", "1"],  # [4, 6, 6] beside [6, 6, 6]: adapters both ways
        embedding_hooks=["4", "4"],  # the classifiers' inputs: MCL heads
        terms=["kl", "feature", "mcl"],
        rule="mutual",
        warmup_steps=0,
        example_input=torch.randn(2, 3, 6, 6),
    )
    snapshots = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * step + rank)
        group.step((torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)))
        snapshots.append(torch.cat([p.detach().flatten() for p in group.terms.parameters()]))
    params = torch.cat([p.detach().flatten() for m in members for p in m.parameters()])
    torch.save({"parts": torch.stack(snapshots), "params": params}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    _exit()


def test_ddp_keeps_adapters_and_heads_identical_on_every_rank_at_every_step(tmp_path):
    mp.start_processes(_hetero_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    torch.testing.assert_close(r0["parts"], r1["parts"], rtol=0, atol=0)
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)
    assert not torch.equal(r0["parts"][0], r0["parts"][-1])  # the parts did train


def _perturbation_worker(rank, world, out):
    sys.path.insert(0, os.path.dirname(__file__))
    from reference import tiny_cnn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from competitive import CompetitiveGroup, PerturbationPool

    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    torch.set_num_threads(1)
    members = [DDP(tiny_cnn(width=4, seed=i, dtype=torch.float32)) for i in range(2)]
    torch.manual_seed(10 + rank)  # each rank its own local seed; the group takes rank 0's
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in members]
    group = CompetitiveGroup(members, optimizers, perturbation=PerturbationPool(p=1.0))
    draws = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * step + rank)
        result = group.step((torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)))
        draws.append((result.perturbed, result.perturbation))
    torch.save({"draws": draws, "seed": group.seed, "initial": torch.initial_seed()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    _exit()


def test_ranks_with_different_local_seeds_perturb_the_same_member_with_the_same_operation(tmp_path):
    mp.start_processes(_perturbation_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert (r0["initial"], r1["initial"]) == (10, 11)
    assert r0["seed"] == r1["seed"] == 10  # rank 0's, broadcast at construction
    assert r0["draws"] == r1["draws"]
    assert len(set(r0["draws"])) > 1  # the draws vary from step to step
