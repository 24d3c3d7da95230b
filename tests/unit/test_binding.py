"""CPU binding: the vendor's NUMA split on captured tool outputs, the CUDA
sysfs split on a fake tree, the CPU split in real processes.

The tools are replaced only at the subprocess boundary (``subprocess.run``):
every parser and the whole algorithm run as they would on the server.
Expected CPU sets are worked out by hand from the files in ``data/npu``
(see its README for the two machines).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
from pathlib import Path

import pytest

from vicuna_bench import binding
from vicuna_bench.errors import UserError

DATA = Path(__file__).parent / "data" / "npu"

# node 0 of the A2 host: 0-23,48-71; node 1: 24-47,72-95.
A2_NODE0 = list(range(0, 24)) + list(range(48, 72))
A2_NODE1 = list(range(24, 48)) + list(range(72, 96))


class FakeTools:
    """``subprocess.run`` answering from captured files; records the calls."""

    def __init__(self, machine: str, missing: tuple[str, ...] = (), overrides: dict | None = None):
        self.machine = machine
        self.missing = missing
        self.overrides = overrides or {}
        self.calls: list[list[str]] = []

    def file_for(self, argv: list[str]) -> Path:
        m = self.machine
        if argv[:2] == ["npu-smi", "info"] and argv[2:] in (["-t", "board", "-m"], ["-m"]):
            return DATA / f"{m}_board_m.txt"
        if argv[:4] == ["npu-smi", "info", "-t", "board"] and argv[4] == "-i":
            return DATA / f"{m}_board_i{argv[5]}_c{argv[7]}.txt"
        if argv[0] == "lspci":
            bus = argv[2].split(":")[1].lower()
            return DATA / f"{m}_lspci_{bus}.txt"
        if argv == ["lscpu"]:
            return DATA / f"{m}_lscpu.txt"
        raise AssertionError(f"unexpected command {argv}")

    def __call__(self, argv, **kwargs):
        argv = list(argv)
        self.calls.append(argv)
        if argv[0] in self.missing:
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        key = " ".join(argv)
        text = self.overrides[key] if key in self.overrides else self.file_for(argv).read_text()
        return subprocess.CompletedProcess(argv, 0, stdout=text, stderr="")


@pytest.fixture
def tools(monkeypatch):
    def install(machine="a2", **kw):
        fake = FakeTools(machine, **kw)
        monkeypatch.setattr(subprocess, "run", fake)
        return fake

    return install


# ------------------------------------------------------------------ parsers

def test_cpu_list_accepts_single_cpu_items_the_vendor_rejects():
    assert binding.parse_cpu_list("0-2,5,8-9") == [0, 1, 2, 5, 8, 9]
    assert binding.parse_cpu_list("5") == [5]
    assert binding.parse_cpu_list("0,2,4\n") == [0, 2, 4]
    with pytest.raises(ValueError):
        binding.parse_cpu_list("3-1")
    with pytest.raises(ValueError):
        binding.parse_cpu_list("a-b")


def test_format_cpu_list_is_compact():
    assert binding.format_cpu_list([44, 45, 46, 47, 72, 73, 74]) == "44-47,72-74"
    assert binding.format_cpu_list([8, 10]) == "8,10"


def test_chip_map_skips_header_and_mcu_rows():
    chips = binding.parse_npu_chip_map((DATA / "a2_board_m.txt").read_text())
    assert chips == {n: (n, 0) for n in range(8)}
    chips = binding.parse_npu_chip_map((DATA / "310p_board_m.txt").read_text())
    assert chips == {0: (1, 0), 1: (1, 1)}


def test_pcie_bus_both_spellings():
    assert binding.parse_npu_pcie_bus((DATA / "a2_board_i5_c0.txt").read_text()) == "0000:41:00.0"
    assert binding.parse_npu_pcie_bus((DATA / "310p_board_i1_c1.txt").read_text()) == "0000:04:00.0"
    assert binding.parse_npu_pcie_bus("        PCIeBusInfo                    : 0000:C2:00.0\n") == "0000:C2:00.0"
    assert binding.parse_npu_pcie_bus("        Chip Name : 910B3\n") is None


def test_lspci_numa_node():
    assert binding.parse_lspci_numa_node((DATA / "a2_lspci_c1.txt").read_text()) == 1
    assert binding.parse_lspci_numa_node((DATA / "a2_lspci_41.txt").read_text()) == 0
    assert binding.parse_lspci_numa_node("01:00.0 VGA compatible controller\n\tLatency: 0\n") is None


def test_lscpu_numa_cpus_ignores_node_count_line():
    nodes = binding.parse_lscpu_numa_cpus((DATA / "a2_lscpu.txt").read_text())
    assert nodes == {0: A2_NODE0, 1: A2_NODE1}
    nodes = binding.parse_lscpu_numa_cpus((DATA / "310p_lscpu.txt").read_text())
    assert nodes == {0: [0, 2, 4, 6, 8, 10, 12, 14], 1: [1, 3, 5, 7, 9, 11, 13, 15]}


# ------------------------------------------------------------------ NPU: the vendor's split

@pytest.mark.parametrize(
    "device, node, cpus",
    [
        # node 1 holds devices [0,2,4,6]: 48 CPUs / 4 = 12 each.
        (0, 1, list(range(24, 36))),
        (2, 1, list(range(36, 48))),
        (6, 1, list(range(84, 96))),  # index 3: node-1 list [36:48] = 84..95
        # node 0 holds [1,3,5,7]; device 5 is index 2: node-0 list [24:36] = 48..59
        (5, 0, list(range(48, 60))),
        (1, 0, list(range(0, 12))),
    ],
)
def test_npu_eight_device_two_node_split(tools, device, node, cpus):
    fake = tools("a2")
    b = binding.plan_binding("npu", device, 8, list(range(8)), env={})
    assert b.warning is None
    assert b.device == f"npu:{device}"
    assert b.numa_node == node
    assert list(b.cpus) == cpus
    assert ["lspci", "-s", "0000:41:00.0", "-vvv"] in fake.calls


def test_npu_split_covers_each_node_without_overlap(tools):
    tools("a2")
    plans = [binding.plan_binding("npu", r, 8, list(range(8)), env={}) for r in range(8)]
    node0 = sorted(c for b in plans if b.numa_node == 0 for c in b.cpus)
    node1 = sorted(c for b in plans if b.numa_node == 1 for c in b.cpus)
    assert node0 == sorted(A2_NODE0)
    assert node1 == sorted(A2_NODE1)


def test_cpu_binding_num_honoured_across_range_boundary(tools):
    tools("a2")
    # Devices 0 and 2 share node 1 (2 x 20 <= 48 CPUs); device 2 is index 1:
    # node-1 list [20:40] = 44..47 then 72..87.
    b = binding.plan_binding("npu", 1, 2, [0, 2], env={"CPU_BINDING_NUM": "20"})
    assert list(b.cpus) == [44, 45, 46, 47] + list(range(72, 88))
    assert "20 CPUs each" in b.how


def test_cpu_binding_num_too_large_for_the_node_warns_and_runs_unbound(tools, caplog):
    tools("a2")
    with caplog.at_level(logging.WARNING, logger="vicuna_bench"):
        b = binding.plan_binding("npu", 0, 8, list(range(8)), env={"CPU_BINDING_NUM": "13"})  # 4 x 13 > 48
    assert b.cpus is None
    assert "CPU_BINDING_NUM=13" in b.warning and "decrease" in b.warning
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


@pytest.mark.parametrize("value", ["twelve", "0", "-3"])
def test_malformed_cpu_binding_num_is_a_user_error(tools, value):
    tools("a2")
    with pytest.raises(UserError, match=f"CPU_BINDING_NUM={value!r}"):
        binding.plan_binding("npu", 0, 8, list(range(8)), env={"CPU_BINDING_NUM": value})


def test_only_this_jobs_devices_share_a_node(tools):
    tools("a2")
    # Two ranks on devices 4 (node 1) and 5 (node 0): each is alone on its node.
    assert list(binding.plan_binding("npu", 0, 2, [4, 5], env={}).cpus) == A2_NODE1
    assert list(binding.plan_binding("npu", 1, 2, [4, 5], env={}).cpus) == A2_NODE0


def test_visible_devices_renumber_torch_indices(tools):
    tools("a2")
    env = {"ASCEND_RT_VISIBLE_DEVICES": "4,5,6,7"}
    # torch device 1 is logic id 5 (node 0, shared with 7): index 0, 24 CPUs.
    b = binding.plan_binding("npu", 1, 4, [0, 1, 2, 3], env=env)
    assert b.device == "npu:1"
    assert b.numa_node == 0
    assert list(b.cpus) == list(range(0, 24))


def test_visible_devices_unset_does_not_crash(tools, monkeypatch):
    tools("a2")
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CPU_BINDING_NUM", raising=False)
    b = binding.plan_binding("npu", 3, 8)  # env defaults to os.environ; devices to 0..7
    assert b.numa_node == 0
    assert list(b.cpus) == list(range(12, 24))  # device 3: index 1 on node 0


def test_310p_card_split_on_single_cpu_lscpu_items(tools):
    tools("310p")
    # Both chips on node 0 (8 CPUs listed singly): 4 each; logic id 1 is index 1.
    b = binding.plan_binding("npu", 1, 2, [0, 1], env={})
    assert b.numa_node == 0
    assert list(b.cpus) == [8, 10, 12, 14]


def test_missing_tool_warns_once_and_runs_unbound(tools, caplog):
    tools("a2", missing=("lspci",))
    with caplog.at_level(logging.WARNING, logger="vicuna_bench"):
        b = binding.plan_binding("npu", 0, 8, list(range(8)), env={})
    assert b.cpus is None
    assert "lspci not found" in b.warning
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "running unbound" in warnings[0]
    assert "unbound" in b.describe()


def test_npu_smi_missing_warns(tools):
    tools("a2", missing=("npu-smi",))
    b = binding.plan_binding("npu", 0, 1, [0], env={})
    assert b.cpus is None and "npu-smi not found" in b.warning


def test_unknown_logic_id_warns(tools):
    tools("a2")
    b = binding.plan_binding("npu", 0, 1, [9], env={})
    assert b.cpus is None and "logic id 9" in b.warning


def test_failing_tool_exit_status_warns(tools, monkeypatch):
    def failing(argv, **kw):
        raise subprocess.CalledProcessError(255, argv)

    monkeypatch.setattr(subprocess, "run", failing)
    b = binding.plan_binding("npu", 0, 1, [0], env={})
    assert b.cpus is None and "exited 255" in b.warning


def test_garbled_lscpu_warns_rather_than_crashing(tools):
    tools("a2", overrides={"lscpu": "NUMA node1 CPU(s):   24-x\n"})
    b = binding.plan_binding("npu", 0, 8, list(range(8)), env={})
    assert b.cpus is None and "ValueError" in b.warning and "24-x" in b.warning


def test_short_device_ids_is_a_user_error():
    with pytest.raises(UserError, match="world size 4"):
        binding.plan_binding("npu", 0, 4, [0, 1], env={})


# ------------------------------------------------------------------ CUDA: sysfs

def _fake_sysfs(root: Path, devices: dict[str, tuple[int, str]]) -> None:
    for bus, (node, cpulist) in devices.items():
        d = root / "sys/bus/pci/devices" / bus
        d.mkdir(parents=True)
        (d / "numa_node").write_text(f"{node}\n")
        (d / "local_cpulist").write_text(f"{cpulist}\n")


def test_cuda_split_from_sysfs(tmp_path):
    buses = {0: "0000:17:00.0", 1: "0000:31:00.0", 2: "0000:b1:00.0", 3: "0000:ca:00.0"}
    _fake_sysfs(tmp_path, {
        buses[0]: (0, "0-15,32-47"), buses[1]: (0, "0-15,32-47"),
        buses[2]: (1, "16-31,48-63"), buses[3]: (1, "16-31,48-63"),
    })
    plan = lambda r: binding.plan_binding("cuda", r, 4, env={}, sysfs_root=tmp_path, cuda_bus=buses.__getitem__)
    # 32 CPUs per node, 2 GPUs each: 16 each; GPU 1 is index 1 on node 0 -> list [16:32] = 32..47.
    b = plan(1)
    assert (b.device, b.numa_node, list(b.cpus)) == ("cuda:1", 0, list(range(32, 48)))
    b = plan(2)
    assert (b.numa_node, list(b.cpus)) == (1, list(range(16, 32)))


def test_cuda_without_numa_locality_shares_all(tmp_path):
    buses = {0: "0000:01:00.0", 1: "0000:02:00.0"}
    _fake_sysfs(tmp_path, {buses[0]: (-1, "0-7"), buses[1]: (-1, "0-7")})
    b = binding.plan_binding("cuda", 1, 2, env={}, sysfs_root=tmp_path, cuda_bus=buses.__getitem__)
    assert b.numa_node is None
    assert list(b.cpus) == [4, 5, 6, 7]


def test_cuda_bus_unknown_to_torch_warns(tmp_path):
    def no_gpu(index):
        raise RuntimeError("Found no NVIDIA driver on your system")

    b = binding.plan_binding("cuda", 0, 1, env={}, sysfs_root=tmp_path, cuda_bus=no_gpu)
    assert b.cpus is None and "no NVIDIA driver" in b.warning


def test_cuda_missing_sysfs_warns(tmp_path):
    b = binding.plan_binding("cuda", 0, 1, env={}, sysfs_root=tmp_path, cuda_bus=lambda i: "0000:01:00.0")
    assert b.cpus is None and "numa_node" in b.warning


# ------------------------------------------------------------------ CPU: split the allowed set

def test_cpu_even_split_of_allowed_cpus():
    allowed = [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]  # 10 CPUs over 3 ranks: 4, 3, 3
    shares = [list(binding.plan_binding("cpu", r, 3, allowed=allowed).cpus) for r in range(3)]
    assert shares == [[0, 1, 2, 3], [4, 5, 6], [8, 9, 10]]


def test_cpu_fewer_cpus_than_ranks_warns():
    b = binding.plan_binding("cpu", 2, 3, allowed=[0, 1])
    assert b.cpus is None and "fewer than one each" in b.warning


def test_binding_off_is_unbound_without_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="vicuna_bench"):
        b = binding.bind_rank("npu", 1, 2, [4, 5], enabled=False)
    assert (b.cpus, b.warning, b.device) == (None, None, "npu:5")
    assert not caplog.records


def test_apply_failure_warns_and_returns_unbound(monkeypatch):
    def refuse(pid, cpus):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    b = binding.apply_binding(binding.CpuBinding(0, "cpu", (999,), None, "test"))
    assert b.cpus is None and "Invalid argument" in b.warning


def test_record_is_json_ready():
    rec = binding.CpuBinding(5, "npu:5", tuple(range(48, 60)), 0, "how").as_record()
    assert rec == {"rank": 5, "device": "npu:5", "cpus": "48-59", "numa_node": 0, "how": "how", "warning": None}


def _bind_and_report(rank: int, world_size: int, queue) -> None:
    b = binding.bind_rank("cpu", rank, world_size)
    queue.put((rank, b.cpus, sorted(os.sched_getaffinity(0))))


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux CPU affinity")
def test_two_real_ranks_get_disjoint_covering_affinities():
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs at least 2 allowed CPUs")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_bind_and_report, args=(r, 2, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (planned, actual)) for r, planned, actual in (queue.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    a0, a1 = results[0][1], results[1][1]
    assert a0 and a1
    assert set(a0).isdisjoint(a1)
    assert sorted(a0 + a1) == allowed
    assert list(results[0][0]) == a0  # the process runs where the plan said
