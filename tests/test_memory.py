"""Keeping freed CPU memory: the mechanism (page faults in a fresh process) and the group's use of it."""

import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from competitive import CompetitiveGroup, memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# allocate and touch 48 blocks of 4 MiB, free them, three times: page faults of the last two rounds
CYCLES = """
import resource, sys, torch
from competitive.memory import keep_freed_memory
answer = keep_freed_memory() if sys.argv[1] == "keep" else "default"
def cycle():
    blocks = [torch.ones(2**20) for _ in range(48)]
    del blocks
cycle()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cycle(); cycle()
print("faults", answer, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in memory.ENVIRONMENT and k != "LD_PRELOAD"}
    return {**env, **extra}


def _faults(mode, env):
    out = subprocess.run([sys.executable, "-c", CYCLES, mode], env=env, capture_output=True, text=True, check=True)
    line = next(line for line in out.stdout.splitlines() if line.startswith("faults "))
    answer, faults = line.removeprefix("faults ").rsplit(" ", 1)
    return answer, int(faults)


@glibc
def test_kept_memory_is_not_faulted_in_again():
    # glibc's default returns the freed top of the heap to the OS (192 MiB free > its 8 MiB trim
    # threshold), and a later round faults its 48 x 1024 pages in again; kept, the rounds reuse them
    _, default = _faults("default", _clean_env())
    answer, kept = _faults("keep", _clean_env())
    assert answer == "kept"
    assert default > 48 * 1024 * 0.9
    assert kept < 48 * 1024 / 10  # not one round faulted in again (a stray block may be)


@glibc
def test_users_malloc_settings_are_left_alone():
    answer, faults = _faults("keep", _clean_env(MALLOC_TOP_PAD_="131072"))
    assert answer == "environment"
    assert faults > 48 * 1024 * 0.9  # nothing was changed: the memory is returned and faulted in again
    answer, _ = _faults("keep", _clean_env(LD_PRELOAD="libjemalloc.so.2-not-here"))
    assert answer == "preloaded allocator"


def _group(**kwargs):
    torch.manual_seed(0)
    nets = [nn.Linear(4, 3), nn.Linear(4, 3)]
    return CompetitiveGroup(nets, [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets], **kwargs)


def test_group_keeps_memory_at_its_first_cpu_training_step(monkeypatch):
    calls = []
    monkeypatch.setattr("competitive.group.keep_freed_memory", lambda: calls.append(1) or "kept")
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    group = _group()
    group.evaluate(batch)
    assert calls == [] and group.cpu_memory is None  # validation moves nothing
    group.step(batch)
    group.step(batch)
    assert calls == [1] and group.cpu_memory == "kept"
    off = _group(keep_cpu_memory=False)
    off.step(batch)
    assert calls == [1] and off.cpu_memory is None


def test_keep_cpu_memory_must_be_a_bool():
    with pytest.raises(TypeError, match="keep_cpu_memory value 'yes'"):
        _group(keep_cpu_memory="yes")
