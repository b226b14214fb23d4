"""Every numeric tolerance the tests use, with where it comes from."""

# FP32 accumulation-order differences between two correct FP32 computations of the same sum:
# a few ulps of FP32 (2**-23 ~ 1.2e-7) times sqrt(K) for K-term dot products; 1e-5 relative covers K <= 1e4.
FP32_ORDER_RTOL = 1e-5
FP32_ORDER_ATOL = 1e-6

# One FP16 rounding: half an ulp of an 11-bit significand, 2**-11 relative. Two FP16 computations of the same
# value that round in another order (a DDP all-reduce of two ranks' FP16 gradients against one FP16 backward
# over both ranks' data) differ by a few such ulps.
FP16_ULP_RTOL = 2 ** -11

# `mixprec train --nproc 2` against one process on the same global batch, bf16-mixed (DDP or FSDP2): each rank's
# BF16 GEMMs round the gradient of half the batch, which the FP32 reduction then averages, where one process
# rounds the whole batch's once: up to a BF16 ulp (2**-8) apart in some gradient elements, which AdamW's
# normalized steps pass on to the loss only faintly. Measured 1.0e-5 relative over 8 steps of the tiny GPT
# (FP32: 9e-8, one FP32 ulp of the loss; fp16-mixed 9e-7); asserted with a 10x margin.
DATA_PARALLEL_BF16_LOSS_RTOL = 1e-4

# Mixed-precision training matching FP32 training: final loss within 1 % of FP32's (the target).
MIXED_FINAL_LOSS_RTOL = 0.01

# FP16 emulation vs PyTorch's native FP16 CPU kernels, one forward/backward of a small GPT. The two differ
# only where FP32 accumulation order moves a value across an FP16 rounding boundary (one FP16 ulp,
# 2**-11 relative, on a few elements), which then propagates: measured ~1e-4 (loss) and ~1e-3 (grads).
EMULATED_VS_NATIVE_FP16_LOSS_RTOL = 1e-3
EMULATED_VS_NATIVE_FP16_GRAD_RTOL = 2e-2

# The head-fused cross entropy against F.cross_entropy on the same FP32 logits. Loss: FP32
# log-sum-exp in another order, so FP32_ORDER_RTOL. Gradients: the logits' gradient is rounded to the
# GEMM's half dtype in both paths, from FP32 values that differ by a few FP32 ulps, so a value near a
# rounding boundary can land one half ulp apart (2**-8 relative for BF16); normwise through the GEMMs
# that is far below 1e-3.
HEAD_LOSS_GRAD_RTOL = 1e-3
# The chunked head loss rounds the unnormalised logits' gradient (softmax - onehot) to the half dtype and
# scales it in FP32 afterwards; the one-pass path rounds the normalised one. Two independent roundings of
# half an ulp each: elementwise up to one ulp apart, normwise about half an ulp: 2**-8 for BF16's 8-bit
# significand, 2**-11 for FP16's 11 bits (FP32 logits' gradients: HEAD_LOSS_GRAD_RTOL).
CHUNKED_HEAD_LOSS_GRAD_RTOL = {"bfloat16": 2 ** -8, "float16": 2 ** -11, "float32": HEAD_LOSS_GRAD_RTOL}
# A gradient penalty through the head and loss (create_graph=True) against the same math op by op: the
# penalty's gradient reaches x and W through their casts to the half operands and is rounded to BF16 there
# (one rounding, half an ulp, 2**-9 relative), where the op-by-op reference rounds all of it; normwise
# under 2**-8. FP32 operands: FP32_ORDER_RTOL. (Without the second-order terms: 14% off.)
GRADIENT_PENALTY_RTOL = {"bfloat16": 2 ** -8, "float32": FP32_ORDER_RTOL}

# ---- FP8 ----
# Float8Linear (blockwise) against FP32 on inputs with outliers: the target. E4M3 keeps 3 mantissa
# bits, a uniform rounding error of 2**-4 relative at most, i.e. an SQNR near 31 dB per quantized operand
# (10*log10(12 * 2**8) ~ 34.9 dB less the loss in subnormal tails); a GEMM of two such operands lands
# near 28-31 dB, so 25 dB leaves ~3-6 dB of room.
FP8_BLOCKWISE_SQNR_DB = 25.0
# cuBLAS FP8 GEMMs and the Triton path against emulate (same codes and scales, FP32 GEMM on the
# dequantized values): only the accumulation differs. Hopper's FP8 tensor cores keep about 14 bits
# in their partial sums before promotion to FP32 (DeepSeek-V3 report, section 3.3.2), i.e. 2**-14 ~ 6e-5
# relative per partial sum; normwise relative error bound 4 * 2**-14 ~ 2.5e-4 with margin for K <= 8192.
FP8_GEMM_VS_EMULATE_RTOL = 2.5e-4
# With use_fast_accum (no periodic FP32 promotion: partial sums over all of K stay in the ~14-bit
# accumulator), errors grow with K; measured bound allowed: 2e-3 normwise at K <= 4096.
FP8_FAST_ACCUM_VS_EMULATE_RTOL = 2e-3
# A BF16 output of the same FP32 value: half a BF16 ulp (8-bit significand), 2**-9 relative.
BF16_OUTPUT_RTOL = 2 ** -9
# Inductor-compiled vs eager FP8 model: the BF16 activations differ by a BF16 rounding here and there
# (fused elementwise ops round once), which moves a few FP8 codes of the output gradient by one step
# (2**-3 relative for E4M3); normwise that is well under 1e-2.
FP8_COMPILED_VS_EAGER_GRAD_RTOL = 1e-2

# ---- train: models, data, loop ----
# Hand-written attention vs torch's SDPA, and the hand-written RMSNorm vs F.rms_norm, in FP32: the same
# sums in another order, so FP32_ORDER_* above. Rotary relative-position property (q(m).k(n) depends on
# m - n only): the angles are FP32 sin/cos of products up to seq_len, ~1e-6 relative after the dot product.
ROTARY_RELATIVE_ATOL = 1e-5

# ---- low-bit optimizer state ----
# The targets: after 100 AdamW steps on the same gradients, |theta_lowbit - theta_torch| at most this
# fraction of the total parameter movement (the summed norm of torch AdamW's per-step updates).
OPTIM_8BIT_DEVIATION = 0.05
OPTIM_FP8_DEVIATION = 0.05
OPTIM_4BIT_DEVIATION = 0.15
# Pure BF16 weight decay, 1000 steps of (1 - lr*wd) = (1 - 1e-4): exact 0.904833; the target 1 %.
OPTIM_BF16_DECAY_RTOL = 0.01
# A small model trained with 8-bit AdamW: final loss within 1 % of FP32 AdamW's (the target).
OPTIM_8BIT_LOSS_RTOL = 0.01
# Our FP32-state AdamW against torch.optim.AdamW: the same formula, evaluated in another order
# (delta = -step*m/denom - lr*wd*p vs p*(1-lr*wd) then addcdiv), so a few FP32 ulps per step; an ulp at
# the parameters' scale (~1: 6e-8) from early steps stays as an absolute error where a value crosses zero,
# 20 steps: ~1e-6.
OPTIM_FP32_VS_TORCH_RTOL = 1e-5
OPTIM_FP32_VS_TORCH_ATOL = 1e-6
# Fused kernel vs the CPU reference: codes, scales and FP32/BF16 moments exact; FP32 parameters differ
# only through the bias corrections once t ln(beta) < -0.5 (before, both evaluate the same FP32 series;
# after, the GPU's exp is approximate, ~2 ulp): a few FP32 ulps of the parameter, or, where a parameter
# crosses zero, a few ulps of the step itself (lr = 1e-2 in the test: ulp 9.3e-10), 3 steps: ~1e-8.
# (The GPU's approximate exp2 in 1 - beta2**t would put ~5e-7 into parameters of ~0.5 after 3 steps.)
# The bias correction 1 - beta**t (reference.one_minus_exp) against float64: a 10-term Horner series in
# FP32 near zero, exp below -0.5; measured <= 1.7 ulps (relative 1.03e-7) over t ln(beta) in [-30, -1e-9].
OPTIM_BIAS_CORRECTION_RTOL = 2 * 2 ** -24
OPTIM_KERNEL_PARAM_RTOL = 2 ** -21
OPTIM_KERNEL_PARAM_ATOL = 1e-8
# BF16/FP16 parameters: those few ulps of FP32 flip a rounding decision on rare elements (one ulp of
# the parameter's dtype each); allowed on at most this fraction of the elements.
OPTIM_KERNEL_FLIP_FRACTION = 1e-3

# A compiled FP32 training run against the eager one, per step loss over a few steps: inductor fuses
# and reorders FP32 reductions (norms, softmax, the loss), each within FP32_ORDER_RTOL, and AdamW's
# division by sqrt(v) amplifies those differences over steps on a tiny model; 1e-4 leaves room for that
# while a wrong graph (a missed op, a stale weight) moves the loss by percents.
COMPILED_VS_EAGER_LOSS_RTOL = 1e-4
# The same for bf16-mixed: inductor fuses ops and so rounds to BF16 at other points than eager does;
# each such rounding moves a value by up to 2**-9 relative, and the loss after a few steps by ~1e-5
# (measured on the tiny GPT); 2**-9 bounds it. FP32 training differs from BF16's by more (~5e-5 here),
# so the test also checks that the compiled BF16 run is not an FP32 one.
COMPILED_VS_EAGER_BF16_LOSS_RTOL = 2 ** -9

# ---- the faults comparison (mixprec compare --task faults, tests/test_train_guard.py) ----
# A rollback drops the steps since its snapshot (a tenth of the run at most) and the guard skips each faulty
# batch: the final validation loss stays near the clean run's (a 1-layer d_model 64 GPT, 80 steps: +1.0 %).
FAULTS_GUARDED_VS_CLEAN_RTOL = 0.05
# A run the faults ruined (skip-only after the LR spike: 6.78 against 3.43) ends this many times above the clean
# run's loss, or NaN.
FAULTS_UNGUARDED_WORSE_FACTOR = 1.5
