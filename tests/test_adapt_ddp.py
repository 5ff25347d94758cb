"""Training under torchrun: 2 CPU processes with gloo end with identical weights; at world size 1 the
same distributed path (process group, DDP, collectives) runs, as `torchrun --nproc_per_node=1` on one GPU."""

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from pipeline.models import create_model
    from pipeline.training import TrainSettings, fit, init_distributed, tensor_loader

    info = init_distributed()
    assert info.enabled and info.world_size == int(sys.argv[2]) and dist.get_backend() == "gloo"
    torch.manual_seed(100 + info.rank)  # different initial weights per rank: DDP must sync them
    model = create_model("compact_cnn_w0.5", 3, "none")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 3, (16,), generator=g)
    res = fit(model, tensor_loader(x, y, batch_size=4, shuffle=True), x[:4], y[:4],
              settings=TrainSettings(epochs=1, lr=0.05, optimizer="sgd"))
    assert len(res.history) == 1
    torch.save(model.state_dict(), f"{sys.argv[1]}/rank{info.rank}.pt")
    dist.destroy_process_group()
    """
)


def _torchrun(tmp_path, world: int) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), str(script),
         str(tmp_path), str(world)],
        capture_output=True, text=True, timeout=240, cwd=root,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_world_size_one_under_torchrun_runs_the_distributed_path(tmp_path):
    _torchrun(tmp_path, 1)
    assert (tmp_path / "rank0.pt").is_file()


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    _torchrun(tmp_path, 2)
    a, b = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))
    fresh = {k: v for k, v in a.items()}
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # it did train: the weights moved away from rank 0's initialisation
    torch.manual_seed(100)
    from pipeline.models import create_model

    init = create_model("compact_cnn_w0.5", 3, "none").state_dict()
    assert not torch.equal(init["head.weight"], fresh["head.weight"])
