"""FP8 training: quantization, Float8Linear, conversion of models.

    cfg = Float8Config(recipe="blockwise")                # or tensorwise, rowwise, delayed
    model = convert(model, cfg)                           # nn.Linear -> Float8Linear where it pays
    print(describe(model))                                # which layers, and why
    q, scale = quantize(x, "fp8_e4m3", granularity="1x128");  x_hat = dequantize(q, scale)
"""
from mixprec.fp8.backends import backend_info, fp8_gemm_supported, resolve_backend, triton_available
from mixprec.fp8.config import Float8Config
from mixprec.fp8.convert import Fp8Decision, convert, default_filter, describe, report, unconvert
from mixprec.fp8.linear import Float8Linear
from mixprec.fp8.quantize import GRANULARITIES, dequantize, quantize, scale_from_amax

__all__ = ["Float8Config", "Float8Linear", "Fp8Decision", "GRANULARITIES", "backend_info", "convert",
           "default_filter", "dequantize", "describe", "fp8_gemm_supported", "quantize", "report",
           "resolve_backend", "scale_from_amax", "triton_available", "unconvert"]
