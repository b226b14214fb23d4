"""INT8 training: quantization, Int8Linear, conversion of models.

    cfg = Int8Config(recipe="rowwise")                    # or switchback; per-matmul switches
    model = convert(model, cfg)                           # nn.Linear -> Int8Linear where it pays
    print(describe(model))                                # which layers, and why (and outlier counts)
    q, scale = quantize(x, "rowwise");  x_hat = dequantize(q, scale)
"""
from mixprec.int8.backends import backend_info, int8_gemm_supported, resolve_backend
from mixprec.int8.config import Int8Config
from mixprec.int8.convert import Int8Decision, convert, default_filter, describe, outliers, report, unconvert
from mixprec.int8.gemm import accumulate, mm_nt
from mixprec.int8.linear import Int8Linear, int8_matmul
from mixprec.int8.quantize import GRANULARITIES, crest_factor, dequantize, quantize, scale_from_amax

__all__ = ["GRANULARITIES", "Int8Config", "Int8Decision", "Int8Linear", "accumulate", "backend_info", "convert",
           "crest_factor", "default_filter", "dequantize", "describe", "int8_gemm_supported", "int8_matmul",
           "mm_nt", "outliers", "quantize", "report", "resolve_backend", "scale_from_amax", "unconvert"]
