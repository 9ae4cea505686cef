"""--sync-bn: BatchNorm layers become SyncBatchNorm under torchrun (CUDA), with the same tensors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from ftwt_cli.io import loading
from ftwt_cli.io.config import resolve
from ftwt_cli.models import create_model
from ftwt_cli.workflows.train.objectives import MaskObjective
from ftwt_cli.workflows.train.processes import Distributed, sync_batchnorm, wrap_for_processes
from ftwt_cli.workflows.train.spec import RunSpec


def _bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_conversion_reaches_every_gated_batchnorm_and_keeps_the_tensors():
    cfg = resolve("smoke")
    torch.manual_seed(0)
    model = loading.wrap(create_model("smallnet", 10), cfg).eval()
    optimizers = MaskObjective(RunSpec(cfg, "ftwt", init="x"), target=None).optimizers(model)
    before = _bn_layers(model)
    params, state = list(model.parameters()), model.state_dict()
    x = torch.randn(4, 3, 32, 32)
    reference = model(x)

    converted = sync_batchnorm(model)
    after = _bn_layers(converted)
    assert len(after) == len(before) == 4 and all(type(m) is nn.SyncBatchNorm for m in after)
    assert all(a is b for a, b in zip(converted.parameters(), params))  # the optimizers still step them
    assert {id(p) for g in optimizers["backbone"].param_groups for p in g["params"]} <= {id(p) for p in params}
    assert converted.state_dict().keys() == state.keys()  # checkpoints load into plain BatchNorm models
    assert torch.equal(converted.eval()(x), reference)


def test_single_process_sync_bn_warns_and_changes_nothing():
    model = create_model("smallnet", 10)
    with pytest.warns(UserWarning, match="no effect in a single process"):
        wrapped, net = wrap_for_processes(model, Distributed(), torch.device("cpu"), sync_bn=True)
    assert wrapped is model and net is model and not any(type(m) is nn.SyncBatchNorm for m in model.modules())


CONVERT_IN_GROUP = textwrap.dedent(
    """
    import sys
    import torch, torch.distributed as dist
    from torch import nn
    from ftwt_cli.errors import BadInput
    from ftwt_cli.models import create_model
    from ftwt_cli.workflows.train.processes import Distributed, wrap_for_processes

    dist.init_process_group("gloo", init_method=sys.argv[1], rank=0, world_size=1)
    group = Distributed(rank=0, world_size=2)  # this process plays rank 0 of a torchrun job
    try:
        wrap_for_processes(create_model("smallnet", 10), group, torch.device("cpu"), sync_bn=True)
    except BadInput as exc:
        print("refused:", exc)
    model, net = wrap_for_processes(create_model("smallnet", 10), group, torch.device("cpu"), sync_bn=False)
    print("ddp:", type(net).__name__, "sync:", any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()))
    dist.destroy_process_group()
    """
)


def test_cpu_process_group_refuses_sync_bn_in_one_line(tmp_path):
    """In a gloo group (CPU) --sync-bn is refused up front: PyTorch's SyncBatchNorm trains on CUDA only."""
    script = tmp_path / "convert.py"
    script.write_text(CONVERT_IN_GROUP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), f"file://{tmp_path / 'rendezvous'}"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: --sync-bn needs CUDA devices" in done.stdout
    assert "ddp: DistributedDataParallel sync: False" in done.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SyncBatchNorm trains on CUDA only")
def test_cuda_process_group_converts(tmp_path):
    torch.distributed.init_process_group("nccl", init_method=f"file://{tmp_path / 'rv'}", rank=0, world_size=1)
    try:
        model, net = wrap_for_processes(create_model("smallnet", 10).cuda(), Distributed(0, 2), torch.device("cuda", 0), True)
        assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        net.train()(torch.randn(4, 3, 32, 32, device="cuda")).sum().backward()
    finally:
        torch.distributed.destroy_process_group()
