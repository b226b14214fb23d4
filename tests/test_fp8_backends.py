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
    assert resolve_backend("auto", "cuda") == "triton"      # every recipe, eager and compiled
    assert "auto -> triton" in backend_info("auto", "cuda") and "Fake GPU" in backend_info("auto", "cuda")
    monkeypatch.setattr(backends, "_TRITON", False)          # CUDA without Triton: cuBLAS for everything
    assert resolve_backend("auto", "cuda") == "cublas"


def test_forward_queries_no_device_under_compile(monkeypatch):
    """Float8Linear resolves its backend on every call; the device's FP8 support is looked up when the
    weight moves, so torch.compile traces a plain bool (dynamo fails on a CUDA query while tracing)."""
    from mixprec.fp8 import linear

    def no_query_while_tracing(device):
        assert not torch.compiler.is_compiling(), "device query inside the compiled graph"
        return False

    monkeypatch.setattr(backends, "fp8_gemm_supported", no_query_while_tracing)
    monkeypatch.setattr(linear, "fp8_gemm_supported", no_query_while_tracing)
    layer = Float8Linear(64, 64, config=Float8Config(recipe="tensorwise"))
    layer.to(torch.float32)                                   # _apply looks the device up again
    torch._dynamo.reset()
    y = torch.compile(layer, backend="eager", fullgraph=True)(torch.randn(8, 64))
    assert y.shape == (8, 64)
    torch._dynamo.reset()


def test_module_notes_its_device_when_moved(fake_gpu):
    layer = Float8Linear(64, 64)
    assert layer._fp8_capable is False                      # CPU weights
    fake_gpu((9, 0))
    layer.to(torch.float32)
    assert layer._fp8_capable is False                      # still on the CPU: only CUDA devices qualify


def test_float8linear_on_cpu_with_cuda_backend_names_emulate():
    layer = Float8Linear(64, 64, config=Float8Config(recipe="tensorwise", backend="cublas"))
    with pytest.raises(ValueError, match="backend='emulate'"):
        layer(torch.randn(2, 64))
