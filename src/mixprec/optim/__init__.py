"""Optimizers with low-precision state and pure-BF16/FP16 parameter updates.

    opt = mixprec.optim.AdamW(params, lr=1e-3, weight_decay=0.1, state_dtype="int8", rounding="stochastic")

See adamw.py for the options, codes.py for the 8/4-bit codes, rounding.py for stochastic rounding
and Kahan compensation, reference.py for the update the fused Triton kernel (_triton_kernel.py) matches.
"""
from mixprec.optim.adamw import BACKENDS, ROUNDINGS, STATE_DTYPES, Adam, AdamW
from mixprec.optim.blockwise import dequantize_blockwise, quantize_blockwise
from mixprec.optim.codes import STATE_FORMATS, Minifloat, StateFormat, get_state_format
from mixprec.optim.rounding import kahan_add, stochastic_round

__all__ = ["Adam", "AdamW", "BACKENDS", "Minifloat", "ROUNDINGS", "STATE_DTYPES", "STATE_FORMATS", "StateFormat",
           "dequantize_blockwise", "get_state_format", "kahan_add", "quantize_blockwise", "stochastic_round"]
