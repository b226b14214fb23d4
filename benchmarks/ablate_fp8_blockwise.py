"""Which part of the blockwise FP8 recipe costs accuracy: `mixprec compare` on one variant of it.

    OMP_NUM_THREADS=1 python benchmarks/ablate_fp8_blockwise.py VARIANT compare --recipes fp8-ablate \
        --d-model 256 --steps 200 --eval-every 50 --seed 1 --quiet --out runs/ablate-VARIANT

VARIANT: `blockwise` (the recipe as is), `pow2` (power-of-2 scales), `w-rowwise` (weights scaled per
row instead of per 128x128 block), `act-rowwise` (activations and output gradients per row instead of
per 1x128 tile). A diagnostic: it patches the recipe table of this process only.
"""
import sys

import torch

from mixprec import policy
from mixprec.fp8 import recipes
from mixprec.fp8.config import Float8Config
from mixprec.train.cli import main

VARIANTS = ("blockwise", "pow2", "w-rowwise", "act-rowwise")

if __name__ == "__main__":
    variant = sys.argv.pop(1) if len(sys.argv) > 1 else ""
    if variant not in VARIANTS:
        sys.exit(f"first argument: one of {', '.join(VARIANTS)}; got {variant!r}")
    if variant == "w-rowwise":
        recipes.GRANULARITY["blockwise"] = ("1x128", "rowwise")
    if variant == "act-rowwise":
        recipes.GRANULARITY["blockwise"] = ("rowwise", "128x128")
    config = Float8Config(recipe="blockwise", power_of_2_scales=variant == "pow2")
    policy._RECIPES["fp8-ablate"] = lambda: policy.Policy(compute_dtype=torch.bfloat16, fp8=config,
                                                          name=f"fp8-ablate-{variant}")
    sys.exit(main())
