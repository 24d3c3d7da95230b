"""What a result depends on besides the code, recorded with every result (engine layer: it asks the device layer,
the energy meter, torchair and our CPU kernels, none of which know of each other)."""

from __future__ import annotations

from . import cpu_kernels, devices, energy, heap
from .npu_graph import torchair_status


def environment_record(device: str, device_index: int = 0, cpu_dtype_auto=None) -> dict:
    """:func:`vicuna_bench.devices.device_record` for device ``device_index`` of ``device`` (cpu | cuda | npu), plus
    the energy meter (:func:`vicuna_bench.energy.describe`: source and resolution, or why there is none), torchair
    on NPU (``unknown``: a torch_npu release not in ``npu_graph.TORCHAIR_OF_TORCH_NPU``; None elsewhere) and, on
    CPU, whether our CPU kernels run (:func:`vicuna_bench.cpu_kernels.status`) and which path each dtype and row
    range takes (``cpu_linear_paths``, :func:`vicuna_bench.cpu_kernels.paths_record`) and the C heap's thresholds
    (``c_heap``, :func:`vicuna_bench.heap.describe`)."""
    record = devices.device_record(device, device_index, cpu_dtype_auto)
    if device == "npu":
        record["torchair"] = torchair_status().record()
    record["energy"] = energy.describe(device, [device_index])
    if device == "cpu":
        cpu_kernels.load()  # whether our CPU kernels run is part of what a CPU result depends on (once per process)
        record.update(cpu_kernels.status())
        # which rows take kernel / kernel+AMX / F.linear / fp32 GEMM
        record["cpu_linear_paths"] = cpu_kernels.paths_record()
        record["c_heap"] = heap.describe()  # a prefill's buffers reused or faulted in per call
    return record
