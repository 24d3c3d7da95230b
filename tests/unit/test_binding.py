"""CPU binding: the vendor's NUMA split on captured tool outputs, the CUDA
sysfs split on a fake tree, the CPU split in real processes.

The tools are replaced only at the subprocess boundary (``subprocess.run``):
every parser and the whole algorithm run as they would on the server, with
the environment run_tool gives each tool.  Expected CPU sets are worked out
by hand from the files in ``data/npu`` (see its README for the machines and
where each capture comes from).
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from vicuna_bench import binding
from vicuna_bench.errors import UserError

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data" / "npu"

# node 0 of the A2 host: 0-23,48-71; node 1: 24-47,72-95.
A2_NODE0 = list(range(0, 24)) + list(range(48, 72))
A2_NODE1 = list(range(24, 48)) + list(range(72, 96))


def messages_locale(env) -> str:
    """The locale a C program's gettext uses for messages under ``env`` (glibc's precedence)."""
    for name in ("LC_ALL", "LC_MESSAGES", "LANG"):
        if env.get(name):
            return env[name]
    return "C"


class FakeTools:
    """``subprocess.run`` answering from captured files; records the calls and the environment each got.

    ``failing`` maps a command line to the exit status it returns; ``lscpu``
    answers in the locale its environment asks for, as util-linux does:
    the C capture under C/POSIX, the zh_CN capture otherwise.
    """

    def __init__(self, machine: str, missing: tuple[str, ...] = (), overrides: dict | None = None,
                 failing: dict | None = None, lscpu_by_locale: tuple[str, str] | None = None):
        self.machine = machine
        self.missing = missing
        self.overrides = overrides or {}
        self.failing = failing or {}
        self.lscpu_by_locale = lscpu_by_locale
        self.calls: list[list[str]] = []
        self.envs: list[dict] = []

    def file_for(self, argv: list[str], env) -> Path:
        m = self.machine
        if argv == ["npu-smi", "info", "-m"] and (DATA / f"{m}_info_m.txt").exists():
            return DATA / f"{m}_info_m.txt"
        if argv[:2] == ["npu-smi", "info"] and argv[2:] in (["-t", "board", "-m"], ["-m"]):
            return DATA / f"{m}_board_m.txt"
        if argv[:4] == ["npu-smi", "info", "-t", "board"] and argv[4] == "-i":
            return DATA / f"{m}_board_i{argv[5]}_c{argv[7]}.txt"
        if argv[0] == "lspci":
            bus = argv[2].split(":")[1].lower()
            return DATA / f"{m}_lspci_{bus}.txt"
        if argv == ["lscpu"] and self.lscpu_by_locale:
            c_file, translated_file = self.lscpu_by_locale
            loc = messages_locale(env)
            return DATA / (c_file if loc in ("C", "POSIX") or loc.startswith("C.") else translated_file)
        if argv == ["lscpu"]:
            return DATA / f"{m}_lscpu.txt"
        raise AssertionError(f"unexpected command {argv}")

    def __call__(self, argv, **kwargs):
        argv = list(argv)
        env = kwargs.get("env")
        env = dict(os.environ) if env is None else env  # subprocess inherits when env is None
        self.calls.append(argv)
        self.envs.append(env)
        if argv[0] in self.missing:
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        key = " ".join(argv)
        if key in self.failing:
            done = subprocess.CompletedProcess(argv, self.failing[key], stdout="", stderr="")
        else:
            text = self.overrides[key] if key in self.overrides else self.file_for(argv, env).read_text()
            done = subprocess.CompletedProcess(argv, 0, stdout=text, stderr="")
        if kwargs.get("check"):
            done.check_returncode()
        return done


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
    fake = tools("a2", missing=("npu-smi",))
    b = binding.plan_binding("npu", 0, 1, [0], env={})
    assert b.cpus is None and "npu-smi not found" in b.warning
    assert len(fake.calls) == 1  # a missing tool is not asked a second way


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


# ------------------------------------------------------------------ NPU on real hosts

# npu-smi 25.x on an A3 (Atlas 800 A3, two dies a card) puts Chip Phy-ID after
# the logic id: the layout of the `npu-smi info -m` outputs in vllm-ascend's
# tests/ut/test_cpu_binding.py and in an xLLM launcher's test (public GitHub),
# 31-character columns as npu-smi prints them.
A3_INFO_M = (
    "NPU ID                         Chip ID                        Chip Logic ID                  "
    "Chip Phy-ID                    Chip Name\n"
    "0                              0                              0                              0                              Ascend910\n"
    "0                              1                              1                              1                              Ascend910\n"
    "0                              2                              -                              -                              Mcu\n"
    "1                              0                              2                              2                              Ascend910\n"
)
# Ascend 950PR: Slot ID, and no logic id column (a Rust scheduler's test data
# on GitHub; a 950DT tool's changelog reports the same five columns).
ASCEND950_INFO_M = "NPU ID Slot ID Chip ID Chip Phy-ID Chip Name\n7 0 0 5 Ascend950PR\n"


def test_chip_map_of_info_m_capture():
    # a2_info_m.txt: the tab-indented layout of a verbatim npu-smi 25.5.1 capture (see data/npu/README.md).
    assert binding.parse_npu_chip_map((DATA / "a2_info_m.txt").read_text()) == {n: (n, 0) for n in range(8)}


def test_chip_map_columns_found_by_header_name():
    assert binding.parse_npu_chip_map(A3_INFO_M) == {0: (0, 0), 1: (0, 1), 2: (1, 0)}


def test_chip_map_without_logic_id_column_is_refused_not_misread():
    # Read by position, this row would say logic id 0 is NPU 7 chip 0 (the slot
    # id taken as the chip id, the chip id as the logic id).
    with pytest.raises(ValueError, match="no Chip Logic ID column"):
        binding.parse_npu_chip_map(ASCEND950_INFO_M)


def test_failing_board_query_falls_back_to_info_m(tools, caplog):
    fake = tools("a2", failing={"npu-smi info -t board -m": 255})
    with caplog.at_level(logging.WARNING, logger="vicuna_bench"):
        b = binding.plan_binding("npu", 5, 8, list(range(8)), env={})
    # Same machine, same answer as through the board query: device 5 is third
    # of node 0's devices [1,3,5,7] -> node-0 list [24:36] = 48..59.
    assert (b.warning, b.numa_node, list(b.cpus)) == (None, 0, list(range(48, 60)))
    assert fake.calls[:2] == [["npu-smi", "info", "-t", "board", "-m"], ["npu-smi", "info", "-m"]]
    assert "npu-smi info -m" in b.how and "exited 255" in b.how
    assert not caplog.records


def test_both_chip_queries_failing_warns_once_naming_both(tools, caplog):
    tools("a2", failing={"npu-smi info -t board -m": 255, "npu-smi info -m": 2})
    with caplog.at_level(logging.WARNING, logger="vicuna_bench"):
        b = binding.plan_binding("npu", 0, 1, [0], env={})
    assert b.cpus is None
    assert "`npu-smi info -t board -m` exited 255" in b.warning and "`npu-smi info -m` exited 2" in b.warning
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_chip_table_without_logic_ids_in_both_queries_warns(tools):
    tools("a2", overrides={"npu-smi info -t board -m": ASCEND950_INFO_M, "npu-smi info -m": ASCEND950_INFO_M})
    b = binding.plan_binding("npu", 0, 1, [0], env={})
    assert b.cpus is None and "no Chip Logic ID column" in b.warning


def test_exit_status_message_carries_the_tools_first_stderr_line():
    def failing(argv):
        raise subprocess.CalledProcessError(1, argv, output="", stderr="\nfirst line\nsecond line\n")

    b = binding.plan_binding("npu", 0, 1, [0], env={}, run=failing)
    assert "exited 1: first line" in b.warning and "second line" not in b.warning


def test_chinese_locale_lscpu_capture_has_no_line_the_parser_reads():
    # host_lscpu_zh_CN.txt: util-linux 2.38.1's lscpu under zh_CN.UTF-8 (its
    # Debian zh_CN catalogue: "NUMA node%d CPU(s):" -> "NUMA 节点%d CPU："),
    # host_lscpu_C.txt the same host under C.
    zh = (DATA / "host_lscpu_zh_CN.txt").read_text(encoding="utf-8")
    assert "NUMA 节点0 CPU：" in zh
    assert binding.parse_lscpu_numa_cpus(zh) == {}
    assert binding.parse_lscpu_numa_cpus((DATA / "host_lscpu_C.txt").read_text()) == {0: [0, 1]}


@pytest.fixture
def chinese_locale_host(monkeypatch):
    """The rank's environment on a server installed in Chinese."""
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    monkeypatch.setenv("LC_ALL", "zh_CN.UTF-8")
    monkeypatch.setenv("LANGUAGE", "zh_CN:zh")


def test_binding_succeeds_on_a_chinese_locale_host(tools, chinese_locale_host):
    fake = tools("a2", lscpu_by_locale=("host_lscpu_C.txt", "host_lscpu_zh_CN.txt"))
    # The fake answers in Chinese to an inherited environment:
    assert "节点" in fake(["lscpu"]).stdout
    fake.calls.clear()
    fake.envs.clear()
    # Devices 1 and 5 sit on node 0 (buses 01, 41), node 0 holds CPUs 0,1:
    # one each, device 5 second.
    b = binding.plan_binding("npu", 1, 2, [1, 5], env={})
    assert (b.warning, b.numa_node, b.cpus) == (None, 0, (1,))
    assert ["lscpu"] in fake.calls
    for argv, env in zip(fake.calls, fake.envs):
        assert (env["LC_ALL"], env["LANG"], "LANGUAGE" in env) == ("C", "C", False), argv


# PCIe buses the a2 machine's npu-smi prints (data/npu/a2_board_i*_c0.txt), by device.
A2_BUSES = {0: "0000:C1:00.0", 1: "0000:01:00.0", 2: "0000:C2:00.0", 3: "0000:02:00.0",
            4: "0000:81:00.0", 5: "0000:41:00.0", 6: "0000:82:00.0", 7: "0000:42:00.0"}


def _fake_pci_numa(root: Path, nodes: dict[str, int]) -> None:
    """A sysfs tree as the kernel names it: lower-case hex, 4-digit domain."""
    for bus, node in nodes.items():
        d = root / "sys/bus/pci/devices" / bus
        d.mkdir(parents=True)
        (d / "numa_node").write_text(f"{node}\n")


def _a2_sysfs(root: Path) -> None:
    # As lspci says (data/npu/a2_lspci_*.txt): buses below 0x80 on node 0.
    _fake_pci_numa(root, {bus.lower(): (0 if int(bus[5:7], 16) < 0x80 else 1) for bus in A2_BUSES.values()})


def test_sysfs_address_of_what_tools_print():
    assert binding.sysfs_pci_address("0000:C1:00.0") == "0000:c1:00.0"
    assert binding.sysfs_pci_address(" C1:00.0\n") == "0000:c1:00.0"
    assert binding.sysfs_pci_address("00000000:4F:00.0") == "0000:4f:00.0"  # nvidia-smi's 8-digit domain
    with pytest.raises(binding.BindingFailed, match="not a PCI address"):
        binding.sysfs_pci_address("0000:C1:00")


@pytest.mark.parametrize("lspci", ["missing", "failing"])
@pytest.mark.parametrize("device, node, cpus", [(0, 1, list(range(24, 36))), (5, 0, list(range(48, 60)))])
def test_numa_node_from_sysfs_when_lspci_cannot_say(tools, tmp_path, caplog, lspci, device, node, cpus):
    _a2_sysfs(tmp_path)
    if lspci == "missing":
        fake = tools("a2", missing=("lspci",))
    else:
        fake = tools("a2", failing={f"lspci -s {A2_BUSES[d]} -vvv": 1 for d in range(8)})
    with caplog.at_level(logging.WARNING, logger="vicuna_bench"):
        b = binding.plan_binding("npu", device, 8, list(range(8)), env={}, sysfs_root=tmp_path)
    # The same split as through lspci (test_npu_eight_device_two_node_split).
    assert (b.warning, b.numa_node, list(b.cpus)) == (None, node, cpus)
    assert "sysfs" in b.how
    assert any(argv[0] == "lspci" for argv in fake.calls)  # lspci first, as the vendor
    assert not caplog.records


def test_lspci_and_sysfs_both_failing_warns_once_naming_both(tools, tmp_path, caplog):
    tools("a2", missing=("lspci",))
    with caplog.at_level(logging.WARNING, logger="vicuna_bench"):
        b = binding.plan_binding("npu", 0, 1, [0], env={}, sysfs_root=tmp_path)
    assert b.cpus is None and "lspci not found" in b.warning and "cannot read" in b.warning
    assert "0000:c1:00.0/numa_node" in b.warning
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_no_numa_node_on_a_one_node_host_binds_to_that_node(tools, tmp_path):
    _fake_pci_numa(tmp_path, {bus.lower(): -1 for bus in A2_BUSES.values()})
    tools("a2", missing=("lspci",), overrides={"lscpu": (DATA / "host_lscpu_C.txt").read_text()})
    # One node (CPUs 0,1) for devices [0,1]: one CPU each, device 1 second.
    b = binding.plan_binding("npu", 1, 2, [0, 1], env={}, sysfs_root=tmp_path)
    assert (b.warning, b.numa_node, b.cpus) == (None, 0, (1,))


def test_lspci_silent_on_numa_means_none_known(tools, tmp_path):
    # pciutils prints "NUMA node:" only when the kernel's node is not -1.
    listing = "".join(line for line in (DATA / "a2_lspci_c1.txt").read_text().splitlines(True)
                      if "NUMA node" not in line)
    tools("a2", overrides={"lspci -s 0000:C1:00.0 -vvv": listing, "lspci -s 0000:01:00.0 -vvv": listing,
                           "lscpu": (DATA / "host_lscpu_C.txt").read_text()})
    b = binding.plan_binding("npu", 0, 2, [0, 1], env={}, sysfs_root=tmp_path)  # no sysfs here
    assert (b.warning, b.numa_node, b.cpus) == (None, 0, (0,))


def test_no_numa_node_on_a_two_node_host_runs_unbound(tools, tmp_path, caplog):
    _fake_pci_numa(tmp_path, {bus.lower(): -1 for bus in A2_BUSES.values()})
    tools("a2", missing=("lspci",))
    with caplog.at_level(logging.WARNING, logger="vicuna_bench"):
        b = binding.plan_binding("npu", 0, 2, [0, 1], env={}, sysfs_root=tmp_path)
    assert b.cpus is None and "numa_node -1" in b.warning and "2 NUMA nodes" in b.warning
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


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
