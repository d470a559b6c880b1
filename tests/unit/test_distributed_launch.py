"""The launcher behind `--processes`: ranks start, only rank 0 speaks, a failing rank stops the rest."""

from __future__ import annotations

import os

import pytest

from tunesmith.training.launch import RankFailed, check_processes, run_ranks


def _greet(word: str) -> str:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"{word} from rank {rank} of {world}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return f"{word}-{rank}"


def _fail_on_rank_1() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise ValueError("rank 1 could not read its shard")
    dist.barrier()  # rank 0 would wait here for ever if nobody stopped it


@pytest.mark.slow
def test_ranks_start_and_only_rank_0_prints(capfd):
    results = run_ranks(_greet, ("hello",), 2)
    assert results == {0: "hello-0", 1: "hello-1"}
    out = capfd.readouterr().out
    assert "hello from rank 0 of 2" in out
    assert "from rank 1" not in out


@pytest.mark.slow
def test_a_failing_rank_stops_the_others_with_its_error():
    with pytest.raises(RankFailed, match=r"rank 1 failed: .*rank 1 could not read its shard"):
        run_ranks(_fail_on_rank_1, (), 2)


def test_process_count_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="give 1 or more"):
        check_processes(0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="drop --processes"):
        check_processes(2)
    assert os.environ["WORLD_SIZE"] == "2"
