"""benchmarks/bench_int8.py's code paths at toy sizes on the CPU (emulated INT8, no compile): every GEMM
variant and every GPT variant gives a row, a failing one a row saying why; torchao is timed apart. Its numbers
mean nothing here."""
import json
import math
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_int8_runs_every_variant_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_int8
    out = tmp_path / "int8.json"
    monkeypatch.setattr(sys, "argv", ["bench_int8.py", "--device", "cpu", "--quick", "--json", str(out)])
    assert bench_int8.main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["env"]["device"] == "cpu" and "emulate" in result["env"]["int8_backend"]
    gemm = result["gemm"]
    assert {r["shape"] for r in gemm} == {"M=64 K=128 N=384", "M=64 K=128 N=128"}
    for row in gemm:
        if row["variant"].startswith(("int8", "bf16")):   # FP8's _scaled_mm may be refused on a CPU: a row says so
            assert row["ms"] > 0 and row["TFLOPs"] >= 0, row
    gpt = {r["variant"]: r for r in result["gpt"]}
    assert set(gpt) == {"bf16-mixed", "fp8-rowwise", "int8-rowwise", "int8-switchback", "torchao-int8-mp"}
    for name in ("fp8-rowwise", "int8-rowwise", "int8-switchback"):
        row = gpt[name]
        assert row["low_linears"] == 4 and len(row["vs_bf16_rounds"]) == 2, row   # qkv, proj, two MLP layers
        assert math.isfinite(row["loss"]) and row["loss"] < row["first_loss"] and row["first_loss"] != gpt[
            "bf16-mixed"]["first_loss"], row
    assert gpt["bf16-mixed"]["vs_bf16"] == 1.0
    assert "tokens_per_s" in gpt["torchao-int8-mp"] or gpt["torchao-int8-mp"]["note"]


def test_torchao_is_timed_in_a_group_of_its_own_after_mixprec_variants(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_int8
    kinds = ["fp8-rowwise", bench_int8.TORCHAO, "int8-rowwise", "int8-switchback"]
    assert bench_int8.variant_groups(kinds, 2) == [["fp8-rowwise", "int8-rowwise"], ["int8-switchback"],
                                                   [bench_int8.TORCHAO]]
    assert bench_int8.variant_groups(kinds, 8) == [["fp8-rowwise", "int8-rowwise", "int8-switchback"],
                                                   [bench_int8.TORCHAO]]
    assert bench_int8.variant_groups([], 8) == [[]]
