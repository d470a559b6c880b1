"""Ray Train runs the same loop: 2 CPU workers of a local Ray instance give the per-step losses and
gradient norms of one process accumulating 2 micro-batches."""

from __future__ import annotations

import pytest
import torch
from test_distributed_equality import TOLERANCE, _config, _rows

from tunesmith.training.loop import train

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_thread_like_each_worker():
    """The reference runs with the one thread each worker gets (cpus_per_worker=1); see
    test_distributed_equality.rank_threads_here for why the counts must match."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_ray_workers_equal_one_process_accumulating(tiny_model_dirs, tmp_path):
    pytest.importorskip("ray.train.torch")
    from tunesmith.training.ray_train import ray_train

    model_dir = tiny_model_dirs["llama"]
    one = train(_config(tmp_path, model_dir, "one", grad_accum=2, epochs=1), show_progress=False)
    two = ray_train(_config(tmp_path, model_dir, "ray", grad_accum=1, epochs=1), workers=2, cpus_per_worker=1)
    assert two.steps == one.steps and not two.interrupted
    steps_1, _ = _rows(one.run_dir)
    steps_2, _ = _rows(two.run_dir)
    assert [r["step"] for r in steps_1] == [r["step"] for r in steps_2] and len(steps_1) >= 4
    assert [r["tokens"] for r in steps_1] == [r["tokens"] for r in steps_2]
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor([r[key] for r in steps_1], dtype=torch.float64),
            torch.tensor([r[key] for r in steps_2], dtype=torch.float64),
            rtol=0,
            atol=TOLERANCE,
            msg=key,
        )
    assert (two.run_dir / "adapter" / "adapter_model.safetensors").is_file()
