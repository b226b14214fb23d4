"""Every numeric tolerance the tests use, with where it comes from."""

# FP32 accumulation-order differences between two correct FP32 computations of the same sum:
# a few ulps of FP32 (2**-23 ~ 1.2e-7) times sqrt(K) for K-term dot products; 1e-5 relative covers K <= 1e4.
FP32_ORDER_RTOL = 1e-5
FP32_ORDER_ATOL = 1e-6

# Mixed-precision training matching FP32 training (issue 2): final loss within 1 % of FP32's.
MIXED_FINAL_LOSS_RTOL = 0.01
