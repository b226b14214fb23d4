"""Backend choice without a GPU: the hardware gate names backend="emulate", and "auto" resolves the same
in eager mode and under torch.compile (where it must trace as a constant, with no graph break).

A GPU is simulated by replacing the capability lookup (torch.cuda.is_available itself cannot be patched
on a CPU build: torch.compile then saves the CUDA RNG state); test_fp8_cuda.py checks the real one."""
import pytest
import torch

from mixprec.fp8 import Float8Config, Float8Linear, backend_info, resolve_backend
from mixprec.fp8 import backends


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a CUDA GPU of the given compute capability is present."""
    def install(capability: tuple[int, int]):
        monkeypatch.setattr(backends, "_cuda_capability", torch.compiler.assume_constant_result(lambda index: capability))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    return install


@pytest.mark.parametrize("backend", ["cublas", "triton"])
def test_gpu_below_sm89_names_emulate(fake_gpu, backend):
    fake_gpu((8, 0))                                          # an A100: no FP8 tensor cores
    with pytest.raises(ValueError, match=r"compute capability 8\.9\+.*backend='emulate'") as err:
        resolve_backend(backend, "cuda")
    assert "Fake GPU (compute capability 8.0)" in str(err.value)
    assert resolve_backend("auto", "cuda") == "emulate"       # auto falls back by itself
    assert resolve_backend("emulate", "cuda") == "emulate"


def test_cpu_fast_backends_name_emulate():
    for backend in ("cublas", "triton"):
        with pytest.raises(ValueError, match="backend='emulate'"):
            resolve_backend(backend, "cpu")
    with pytest.raises(ValueError, match="auto, emulate, cublas, triton"):
        resolve_backend("fast", "cpu")


def test_auto_on_hopper_eager_and_compiled(fake_gpu, monkeypatch):
    fake_gpu((9, 0))
    monkeypatch.setattr(backends, "_TRITON", True)
    assert resolve_backend("auto", "cuda", recipe="blockwise", compiling=False) == "triton"
    assert resolve_backend("auto", "cuda", recipe="tensorwise", compiling=False) == "triton"
    assert resolve_backend("auto", "cuda", recipe="tensorwise", compiling=True) == "cublas"
    assert resolve_backend("auto", "cuda", recipe="blockwise", compiling=True) == "triton"
    assert "auto -> triton" in backend_info("auto", "cuda") and "Fake GPU" in backend_info("auto", "cuda")
    monkeypatch.setattr(backends, "_TRITON", False)          # CUDA without Triton: cuBLAS for everything
    assert resolve_backend("auto", "cuda", compiling=False) == "cublas"


def test_resolution_traces_as_a_constant_under_compile(fake_gpu):
    """Float8Linear.forward resolves its backend on every call: that must not break the graph."""
    fake_gpu((9, 0))
    torch._dynamo.reset()

    def pick(x):
        return x + (1.0 if resolve_backend("auto", torch.device("cuda"), recipe="tensorwise") == "cublas" else 2.0)

    out = torch.compile(pick, backend="eager", fullgraph=True)(torch.zeros(3))
    assert torch.equal(out, torch.ones(3))                    # compiling -> cublas for tensorwise
    torch._dynamo.reset()


def test_float8linear_on_cpu_with_cuda_backend_names_emulate():
    layer = Float8Linear(64, 64, config=Float8Config(recipe="tensorwise", backend="cublas"))
    with pytest.raises(ValueError, match="backend='emulate'"):
        layer(torch.randn(2, 64))
