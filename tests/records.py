"""What two runs of one configuration on one host must write alike in their environment records."""

from __future__ import annotations


def drop_measured_rates(environment: dict) -> None:
    """Remove (in place) what each run measured for itself: ``--dtype auto``'s probe rates and the bf16 prefill
    probe's rates (GFLOP/s; on hosts that probe: avx512_bf16 without AMX, AArch64 bf16).  The decisions they made
    (the dtype, each row range's path) stay compared."""
    auto = environment.get("cpu_dtype_auto")
    if auto:
        auto.pop("probe")
    probe = (environment.get("cpu_linear_paths") or {}).get("bf16_probe")
    if probe:
        probe.pop("fp32_gflops")
        probe.pop("bf16_gflops")
