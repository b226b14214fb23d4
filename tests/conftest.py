from datetime import timedelta

import pytest
import torch
import torch.distributed as dist


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread, for files of tiny models: parallel kernels gain nothing there, and on a busy
    2-core machine their threads spin (measured: 5x the CPU time of a file with two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_rank():
    """A world of one gloo rank in this process (DDP, FSDP2 and DTensors need a process group). It is destroyed
    after the test's locals (DDP's reducer holds the group: destroyed before it, the group's teardown can hang);
    the timeout turns a stuck collective into a failure."""
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with no process group of its own")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=120))
    try:
        yield
    finally:
        dist.destroy_process_group()
