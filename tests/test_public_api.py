"""The public names are a contract (DESIGN.md): this freezes them. Importing mixprec stays light."""
import subprocess
import sys

import mixprec as mp

TOP_LEVEL = {
    "Policy", "recipes", "explain", "rules", "formats",
    "prepare", "unprepare", "autocast", "ops",
    "LossScaler", "MasterWeights", "master_params",
    "initialize", "scale_loss", "compat",
    "fp8", "optim",
    "StabilityGuard", "shrink_embedding_grad", "diagnose", "diagnostics", "distributed",
    "convert",
    "__version__",
}

SUBPACKAGES = {
    "ops": {"attention", "cross_entropy", "head_cross_entropy", "linear_fp32_output"},
    "compat": {"apex", "keras"},
    "compat.apex": {"AmpOptimizer", "AutocastForward", "initialize", "load_state_dict", "master_params", "scale_loss",
                    "state_dict"},
    "compat.keras": {"LossScaleOptimizer"},
    "fp8": {"Float8Config", "Float8Linear", "Fp8Decision", "GRANULARITIES", "backend_info", "convert", "default_filter",
            "dequantize", "describe", "fp8_gemm_supported", "quantize", "report", "resolve_backend",
            "scale_from_amax", "triton_available", "unconvert"},
    "optim": {"Adam", "AdamW", "BACKENDS", "Minifloat", "ROUNDINGS", "STATE_DTYPES", "STATE_FORMATS", "StateFormat",
              "dequantize_blockwise", "get_state_format", "kahan_add", "quantize_blockwise", "stochastic_round"},
    "rules": {"BUILTIN_MODULE_RULES", "BUILTIN_OP_RULES", "CUDA_AUTOCAST_EXCEPTIONS", "ModuleRule", "OpRule",
              "Precision", "allow_half", "keep_fp32", "module_rules", "op_rules", "op_table", "register_norm",
              "reset", "rule_for_module", "user_op_rules"},
    "diagnostics": set(['AuditReport', 'DEFAULT_FORMATS', 'DiagnosisMonitor', 'DiagnosisReport', 'GRANULARITIES', 'HighPrecisionLinear', 'KINDS', 'ModuleDiagnosis', 'ModuleOverrides', 'OpRecord', 'PrecisionAudit', 'RangeShift', 'RecommendedPolicy', 'TensorStats', 'audit', 'describe_range_shifts', 'diagnose', 'edges', 'event_diagnosis', 'fractions', 'load_policy', 'range_shifts', 'recommend', 'run_cli_diagnosis', 'save_policy', 'tensor_counts']),
    "distributed": set(['DATA_PARALLEL', 'Ranks', 'ShardPlan', 'WireBytes', 'agree', 'allreduce_hook_in', 'check_devices', 'checkpoint_bytes', 'close_ranks', 'fp32_allreduce_hook', 'fsdp_mixed_precision', 'init_ranks', 'launch', 'load_checkpoint', 'loss_scaler', 'measure_wire', 'model_device', 'parallelize', 'per_rank_batch', 'rank_slice', 'require_initialized', 'save_checkpoint', 'shard_model', 'world_size']),
    "formats": {"FORMATS", "Format", "cast_to", "fast_round_to", "get_format", "representable", "round_to"},
}


def _module(path: str):
    obj = mp
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def test_top_level_names_are_the_contract():
    assert set(mp.__all__) == TOP_LEVEL
    assert len(mp.__all__) == len(set(mp.__all__))
    for name in TOP_LEVEL:
        assert hasattr(mp, name), name


def test_subpackage_names_are_frozen():
    for path, names in SUBPACKAGES.items():
        module = _module(path)
        assert set(module.__all__) == names, path
        for name in names:
            assert hasattr(module, name), f"{path}.{name}"


def test_convert_loads_the_integrations_on_first_use():
    from mixprec.integrations import convert
    assert mp.convert is convert


def test_the_apex_pair_is_the_same_at_the_top_level():
    assert mp.initialize is mp.compat.apex.initialize and mp.scale_loss is mp.compat.apex.scale_loss


def test_importing_mixprec_imports_no_triton_cli_training_or_hosts():
    code = ("import sys, mixprec\n"
            "heavy = [m for m in ('triton', 'mixprec.train', 'mixprec.cli', 'mixprec.integrations', 'lightning',"
            " 'transformers', 'matplotlib') if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
