"""CPU binding: pin each rank's process to CPUs near its device.

A rank's host thread feeds its device; on a two-socket server a process that
wanders to the far socket pays cross-NUMA memory traffic on every launch.
The rules, per device type:

* ``npu``: the vendor's algorithm (atb_speed_sdk ``common/cpu_binding.py``,
  described in shared/spec/NPU.md): logic id -> (npu id, chip id) from
  ``npu-smi info -t board -m`` -> PCIe bus from ``npu-smi info -t board -i
  <npu> -c <chip>`` -> NUMA node from ``lspci -s <bus> -vvv`` -> the node's
  CPUs from ``lscpu``; the node's CPUs are split among this job's devices on
  that node (sorted), ``CPU_BINDING_NUM`` each if set, else an equal share.
* ``cuda``: the same split, the node and its CPUs read from sysfs
  (``/sys/bus/pci/devices/<bus>/numa_node`` and ``local_cpulist``).
* ``cpu``: the CPUs this process may use, split evenly among the ranks.

A failure to bind is one warning line and the run goes on unbound, as the
vendor's launcher does: binding is a speed matter, never a correctness one.
Where the vendor crashes (a single-CPU item such as ``5`` in ``lscpu``;
``ASCEND_RT_VISIBLE_DEVICES`` unset) we do not.  Beyond the vendor, for
hosts as they are: every tool runs in the C locale (a zh_CN server's
``lscpu`` prints ``NUMA 节点0 CPU：``); the chip table falls back to
``npu-smi info -m`` when the board query fails, and its columns are found by
the header's names; the NUMA node comes from sysfs when ``lspci`` is
missing or fails.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .errors import UserError

log = logging.getLogger("vicuna_bench")

# A command runner: argv -> stdout.  Raises OSError (tool missing),
# subprocess.CalledProcessError or subprocess.TimeoutExpired on failure.
Runner = Callable[[Sequence[str]], str]

TOOL_TIMEOUT_S = 60


def c_locale_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with messages forced to the C locale, for a tool whose output is parsed."""
    env = dict(os.environ if base is None else base)
    # lscpu (util-linux) translates its labels: under zh_CN "NUMA node0
    # CPU(s):" is "NUMA 节点0 CPU：" and the parser finds nothing.  LC_ALL
    # outranks LC_MESSAGES and LANG; LANG too, for programs that read it directly.
    # GNU gettext ignores LANGUAGE under C; dropped so no tool's rule matters.
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    env.pop("LANGUAGE", None)
    return env


def run_tool(argv: Sequence[str]) -> str:
    """Run a system tool in the C locale and return its stdout (text); raise if it fails."""
    done = subprocess.run(list(argv), capture_output=True, text=True, encoding="utf-8", errors="replace",
                          env=c_locale_env(), timeout=TOOL_TIMEOUT_S, check=True)
    return done.stdout


class BindingFailed(Exception):
    """A step of the binding could not be done: the rank runs unbound."""


class ToolMissing(BindingFailed):
    """The tool is not installed: asking it another way cannot help."""


@dataclasses.dataclass(frozen=True)
class CpuBinding:
    """Where one rank's process is (to be) pinned.

    ``cpus`` None means unbound; ``warning`` then says why (None when binding
    was switched off on purpose).  ``how`` is one line saying where the CPUs
    came from, for the rank log and the perf outputs.
    """

    rank: int
    device: str  # "npu:5", "cuda:0", "cpu"
    cpus: tuple[int, ...] | None
    numa_node: int | None = None
    how: str = ""
    warning: str | None = None

    def describe(self) -> str:
        """One line for the rank's log."""
        if self.cpus is None:
            why = self.warning or self.how or "binding off"
            return f"rank {self.rank} ({self.device}): unbound: {why}"
        node = "" if self.numa_node is None else f", NUMA node {self.numa_node}"
        return f"rank {self.rank} ({self.device}): CPUs {format_cpu_list(self.cpus)}{node} ({self.how})"

    def as_record(self) -> dict:
        """A JSON-ready record for perf/precision outputs (CPU ids as a list string)."""
        return {
            "rank": self.rank,
            "device": self.device,
            "cpus": None if self.cpus is None else format_cpu_list(self.cpus),
            "numa_node": self.numa_node,
            "how": self.how,
            "warning": self.warning,
        }


# ------------------------------------------------------------------ parsing

def parse_cpu_list(text: str) -> list[int]:
    """CPU ids of a Linux CPU list such as ``0-23,48-71`` or ``5`` (ascending order kept as written)."""
    cpus: list[int] = []
    for item in text.strip().split(","):
        item = item.strip()
        if not item:
            continue
        # A single CPU (``5``) is a legal item: the vendor's parser raises on it.
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if m is None:
            raise ValueError(f"not a CPU list item: {item!r} in {text.strip()!r}")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            raise ValueError(f"descending CPU range {item!r} in {text.strip()!r}")
        cpus.extend(range(first, last + 1))
    return cpus


def format_cpu_list(cpus: Sequence[int]) -> str:
    """The compact Linux form of CPU ids: ``[0,1,2,5]`` -> ``0-2,5``."""
    parts: list[str] = []
    ids = list(cpus)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


# Multi-word column names of npu-smi's chip table, joined before splitting the header.
_CHIP_TABLE_NAMES = ("Chip Logic ID", "Chip Phy-ID", "Chip Name", "Chip ID", "NPU ID", "Slot ID")


def parse_npu_chip_map(text: str) -> dict[int, tuple[int, int]]:
    """``npu-smi info -t board -m`` or ``npu-smi info -m`` -> {chip logic id: (npu id, chip id)}.

    A header ``NPU ID  Chip ID  Chip Logic ID  Chip Name`` then one row per
    chip.  Columns are found by the header's names: npu-smi 25.x on A3 adds
    ``Chip Phy-ID`` after the logic id, and Ascend 950 tables have ``Slot
    ID`` and no logic id at all, which read by position would bind the
    wrong chip (a ValueError instead).  Without a header the vendor's
    positions (0, 1, 2) are used.  Rows whose logic id is not a number
    (``-``: the board's MCU) are not usable devices and are skipped.
    """
    lines = text.splitlines()
    npu_col, chip_col, logic_col = 0, 1, 2
    for i, line in enumerate(lines):
        if "NPU ID" in line and "Chip ID" in line:
            joined = line
            for name in _CHIP_TABLE_NAMES:
                joined = joined.replace(name, name.replace(" ", "_"))
            columns = joined.split()
            if "Chip_Logic_ID" not in columns:
                raise ValueError(f"npu-smi's chip table has no Chip Logic ID column (header: {' '.join(line.split())!r})")
            npu_col, chip_col, logic_col = (columns.index(c) for c in ("NPU_ID", "Chip_ID", "Chip_Logic_ID"))
            lines = lines[i + 1:]
            break
    chips: dict[int, tuple[int, int]] = {}
    last = max(npu_col, chip_col, logic_col)
    for line in lines:
        fields = line.split()
        if len(fields) <= last or not (fields[npu_col].isdigit() and fields[chip_col].isdigit()):
            continue  # blank lines, a header we did not recognise
        if fields[logic_col].isdigit():
            chips[int(fields[logic_col])] = (int(fields[npu_col]), int(fields[chip_col]))
    return chips


def parse_npu_pcie_bus(text: str) -> str | None:
    """``npu-smi info -t board -i N -c C`` -> the PCIe bus (``0000:C1:00.0``), None if absent.

    The key is ``PCIe Bus Info`` on 310P and ``PCIeBusInfo`` on some 910B
    tool versions: compared with spaces removed, as the vendor does.
    """
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and "".join(key.split()).lower() == "pciebusinfo":
            value = value.strip()
            return value or None
    return None


def parse_lspci_numa_node(text: str) -> int | None:
    """``lspci -s BUS -vvv`` -> the device's NUMA node (``NUMA node: 1``), None if absent.

    pciutils prints the line only when the kernel knows a node (not -1).
    """
    m = re.search(r"^\s*NUMA\s+node:\s*(-?\d+)\s*$", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def parse_lscpu_numa_cpus(text: str) -> dict[int, list[int]]:
    """``lscpu`` -> {NUMA node: its CPU ids} from lines ``NUMA node1 CPU(s): 24-47,72-95``."""
    nodes: dict[int, list[int]] = {}
    for m in re.finditer(r"^\s*NUMA\s+node(\d+)\s+CPU\(s\):\s*(\S*)\s*$", text, re.MULTILINE):
        nodes[int(m.group(1))] = parse_cpu_list(m.group(2))
    return nodes


# ------------------------------------------------------------------ the split

def binding_num(env: Mapping[str, str]) -> int | None:
    """``CPU_BINDING_NUM`` (CPUs per device), None when unset; a malformed value is a UserError."""
    raw = env.get("CPU_BINDING_NUM")
    if raw is None or raw.strip() == "":
        return None
    try:
        k = int(raw.strip())
    except ValueError:
        raise UserError(f"CPU_BINDING_NUM={raw!r} is not an integer (valid: a positive number of CPUs per device)") from None
    if k < 1:
        raise UserError(f"CPU_BINDING_NUM={raw!r} must be >= 1 (CPUs per device)")
    return k


def cpus_per_device(node_cpus: int, devices_on_node: int, env: Mapping[str, str]) -> int:
    """CPUs each device on a NUMA node gets: ``CPU_BINDING_NUM`` if set, else an equal share (count)."""
    k = binding_num(env)
    if k is None:
        # The vendor's launcher passes ratio 1.0: int(len * 1.0 // n).
        return int(node_cpus * 1.0 // devices_on_node)
    if k * devices_on_node > node_cpus:
        raise BindingFailed(
            f"CPU_BINDING_NUM={k} for {devices_on_node} devices needs {k * devices_on_node} CPUs "
            f"but the NUMA node has {node_cpus}: decrease CPU_BINDING_NUM"
        )
    return k


def split_node_cpus(node_cpus: Sequence[int], node_devices: Sequence[int], device: int, env: Mapping[str, str]) -> list[int]:
    """The vendor's split: device i of the node's sorted devices gets ``node_cpus[i*k:(i+1)*k]``."""
    ordered = sorted(node_devices)
    k = cpus_per_device(len(node_cpus), len(ordered), env)
    if k < 1:
        raise BindingFailed(f"the NUMA node has {len(node_cpus)} CPUs for {len(ordered)} devices: fewer than one each")
    i = ordered.index(device)
    return list(node_cpus[i * k:(i + 1) * k])


def split_evenly(cpus: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous share of ``cpus``: disjoint across ranks, covering all (the first ranks get one more when uneven)."""
    base, extra = divmod(len(cpus), world_size)
    start = rank * base + min(rank, extra)
    return list(cpus[start:start + base + (1 if rank < extra else 0)])


# ------------------------------------------------------------------ per device type

def _npu_logic_ids(device_ids: Sequence[int], env: Mapping[str, str], chip_map: Mapping[int, tuple[int, int]]) -> list[int]:
    """The chip logic ids of this job's devices, in rank order.

    torch_npu numbers devices within ``ASCEND_RT_VISIBLE_DEVICES`` when it is
    set (like CUDA_VISIBLE_DEVICES), so device d is the d-th listed logic id.
    Unset, device ids are logic ids (the vendor crashes here instead).
    """
    visible_raw = env.get("ASCEND_RT_VISIBLE_DEVICES")
    if visible_raw is None or not visible_raw.strip():
        return list(device_ids)
    try:
        visible = [int(x) for x in visible_raw.split(",") if x.strip()]
    except ValueError:
        raise BindingFailed(f"ASCEND_RT_VISIBLE_DEVICES={visible_raw!r} is not a comma list of ids") from None
    out = []
    for d in device_ids:
        if not 0 <= d < len(visible):
            raise BindingFailed(f"device {d} is not among ASCEND_RT_VISIBLE_DEVICES={visible_raw!r}")
        out.append(visible[d])
    return out


def _run(run: Runner, argv: Sequence[str]) -> str:
    shown = " ".join(argv)
    try:
        return run(argv)
    except FileNotFoundError:
        raise ToolMissing(f"{argv[0]} not found") from None
    except subprocess.CalledProcessError as exc:
        said = _first_line(exc.stderr) or _first_line(exc.output)
        raise BindingFailed(f"`{shown}` exited {exc.returncode}" + (f": {said}" if said else "")) from None
    except subprocess.TimeoutExpired:
        raise BindingFailed(f"`{shown}` timed out") from None
    except OSError as exc:
        raise BindingFailed(f"`{shown}` failed: {exc}") from None


def _first_line(text: str | bytes | None, limit: int = 120) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    line = next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "")
    return line[:limit]


# The vendor's query first; ``npu-smi info -m`` is the same table, and the
# only one some tool versions answer (newer tools such as vllm-ascend ask it).
CHIP_MAP_QUERIES = (("npu-smi", "info", "-t", "board", "-m"), ("npu-smi", "info", "-m"))


def _npu_chip_map(run: Runner) -> tuple[dict[int, tuple[int, int]], str]:
    """{chip logic id: (npu id, chip id)} from the first query that answers, and a note on fallbacks taken."""
    failures: list[str] = []
    for argv in CHIP_MAP_QUERIES:
        shown = " ".join(argv)
        try:
            chips = parse_npu_chip_map(_run(run, argv))
        except ToolMissing:
            raise
        except BindingFailed as exc:
            failures.append(str(exc))
            continue
        except ValueError as exc:
            failures.append(f"`{shown}`: {exc}")
            continue
        if chips:
            return chips, (f"chips from `{shown}` after {'; '.join(failures)}" if failures else "")
        failures.append(f"`{shown}` lists no chip with a logic id")
    raise BindingFailed("; ".join(failures))


_PCI_ADDRESS = re.compile(r"(?:([0-9a-f]{1,8}):)?([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])")


def sysfs_pci_address(bus: str) -> str:
    """The sysfs name of a PCI address as tools print it: ``0000:C1:00.0`` or ``C1:00.0`` -> ``0000:c1:00.0``."""
    m = _PCI_ADDRESS.fullmatch(bus.strip().lower())
    if m is None:
        raise BindingFailed(f"not a PCI address: {bus!r}")
    # sysfs writes the domain with %04x; nvidia-smi prints 8 digits.
    domain = int(m.group(1) or "0", 16)
    return f"{domain:04x}:{m.group(2)}:{m.group(3)}.{m.group(4)}"


def _read_sysfs(root: Path, bus: str, name: str) -> str:
    path = root / "sys/bus/pci/devices" / bus / name
    try:
        return path.read_text()
    except OSError as exc:
        raise BindingFailed(f"cannot read {path}: {exc.strerror or exc}") from None


def sysfs_numa_node(root: Path, bus: str) -> int:
    """The NUMA node the kernel gives PCI device ``bus`` (sysfs name); -1 when the platform reports none."""
    raw = _read_sysfs(root, bus, "numa_node").strip()
    try:
        return int(raw)
    except ValueError:
        raise BindingFailed(f"{root / 'sys/bus/pci/devices' / bus / 'numa_node'} holds {raw!r}, not a NUMA node") from None


def _npu_numa_node(run: Runner, bus: str, sysfs_root: Path) -> tuple[int, str]:
    """NUMA node of the device at ``bus`` (-1: none reported) and, when lspci could not say, why sysfs was read."""
    try:
        text = _run(run, ["lspci", "-s", bus, "-vvv"])
    except BindingFailed as exc:
        lspci_said, listed = str(exc), False
    else:
        node = parse_lspci_numa_node(text)
        if node is not None:
            return node, ""
        listed = bool(text.strip())
        lspci_said = f"lspci shows no NUMA node for {bus}" if listed else f"lspci lists no device {bus}"
    # lspci reads this same file; it is there without pciutils, and on
    # pciutils too old to print the node.
    try:
        return sysfs_numa_node(sysfs_root, sysfs_pci_address(bus)), lspci_said
    except BindingFailed as exc:
        if listed:
            return -1, ""  # pciutils omits the line exactly when the node is -1
        raise BindingFailed(f"{lspci_said}; {exc}") from None


def _plan_npu(rank: int, device_ids: Sequence[int], env: Mapping[str, str], run: Runner,
              sysfs_root: Path) -> tuple[list[int], int, str]:
    chip_map, chips_note = _npu_chip_map(run)
    logic_ids = _npu_logic_ids(device_ids, env, chip_map)
    node_of: dict[int, int] = {}
    sysfs_notes: list[str] = []
    notes: list[str] = []  # fallbacks taken, for the rank log
    for logic in sorted(set(logic_ids)):
        if logic not in chip_map:
            raise BindingFailed(f"npu-smi lists no chip with logic id {logic} (known: {sorted(chip_map)})")
        npu, chip = chip_map[logic]
        bus = parse_npu_pcie_bus(_run(run, ["npu-smi", "info", "-t", "board", "-i", str(npu), "-c", str(chip)]))
        if bus is None:
            raise BindingFailed(f"npu-smi shows no PCIe bus for NPU {npu} chip {chip}")
        node_of[logic], why_sysfs = _npu_numa_node(run, bus, sysfs_root)
        if why_sysfs:
            sysfs_notes.append(why_sysfs)
    all_nodes = parse_lscpu_numa_cpus(_run(run, ["lscpu"]))
    nodes = {n: cpus for n, cpus in all_nodes.items() if cpus}
    unplaced = sorted(logic for logic, n in node_of.items() if n < 0)
    if unplaced:
        # -1: the kernel knows no node for the device (one-node hosts, or
        # firmware without proximity info).  On a one-node host that node is
        # the answer; on more, choosing one would be a guess.
        if len(nodes) != 1:
            raise BindingFailed(f"no NUMA node is known for logic ids {unplaced} (numa_node -1) "
                                f"on a host with {len(nodes)} NUMA nodes")
        (only,) = nodes
        node_of = {logic: (only if n < 0 else n) for logic, n in node_of.items()}
        notes.append(f"numa_node -1 read as the host's only node {only}")
    mine = logic_ids[rank]
    node = node_of[mine]
    node_cpus = nodes.get(node)
    if not node_cpus:
        raise BindingFailed(f"lscpu lists no CPUs for NUMA node {node}")
    peers = sorted(d for d, n in node_of.items() if n == node)
    cpus = split_node_cpus(node_cpus, peers, mine, env)
    sources = "npu-smi/sysfs/lscpu" if sysfs_notes else "npu-smi/lspci/lscpu"
    if sysfs_notes:
        notes.insert(0, f"NUMA node from sysfs: {sysfs_notes[0]}")
    if chips_note:
        notes.insert(0, chips_note)
    if notes:
        sources += f" ({'; '.join(notes)})"
    how = (f"{sources}: logic id {mine} on NUMA node {node} "
           f"({len(node_cpus)} CPUs) shared by devices {peers}, {len(cpus)} CPUs each")
    return cpus, node, how


def cuda_pci_bus(device_index: int) -> str:
    """The sysfs PCI address (``0000:1b:00.0``) of CUDA device ``device_index``."""
    import torch

    props = torch.cuda.get_device_properties(device_index)
    try:
        domain, bus, dev = props.pci_domain_id, props.pci_bus_id, props.pci_device_id
    except AttributeError:
        raise BindingFailed("this torch does not report the GPU's PCI address") from None
    return f"{int(domain):04x}:{int(bus):02x}:{int(dev):02x}.0"


def _plan_cuda(rank: int, device_ids: Sequence[int], env: Mapping[str, str], sysfs_root: Path,
               pci_bus: Callable[[int], str]) -> tuple[list[int], int | None, str]:
    node_of: dict[int, int] = {}
    cpus_of: dict[int, list[int]] = {}
    for d in sorted(set(device_ids)):
        bus = sysfs_pci_address(pci_bus(d))
        node_of[d] = sysfs_numa_node(sysfs_root, bus)
        try:
            cpus_of[d] = parse_cpu_list(_read_sysfs(sysfs_root, bus, "local_cpulist"))
        except ValueError as exc:
            raise BindingFailed(f"sysfs of {bus}: {exc}") from None
    mine = device_ids[rank]
    node = node_of[mine]
    node_cpus = cpus_of[mine]
    if not node_cpus:
        raise BindingFailed(f"sysfs lists no local CPUs for cuda:{mine}")
    peers = sorted(d for d, n in node_of.items() if n == node)
    cpus = split_node_cpus(node_cpus, peers, mine, env)
    # numa_node -1: the platform reports no NUMA locality (one node).
    shown = node if node >= 0 else None
    how = (f"sysfs: cuda:{mine} on NUMA node {node} ({len(node_cpus)} local CPUs) "
           f"shared by devices {peers}, {len(cpus)} CPUs each")
    return cpus, shown, how


def _plan_cpu(rank: int, world_size: int, allowed: Sequence[int]) -> tuple[list[int], None, str]:
    if len(allowed) < world_size:
        raise BindingFailed(f"{len(allowed)} CPUs allowed for {world_size} ranks: fewer than one each")
    cpus = split_evenly(allowed, rank, world_size)
    return cpus, None, f"allowed CPUs {format_cpu_list(allowed)} split evenly among {world_size} ranks"


def allowed_cpus() -> list[int]:
    """CPU ids this process may run on (its current affinity), ascending."""
    if not hasattr(os, "sched_getaffinity"):
        raise BindingFailed("this platform has no CPU affinity call (Linux only)")
    return sorted(os.sched_getaffinity(0))


# shape: the five keyword-only parameters are the host's facts (environment, tools, sysfs, CPUs), injectable for tests
def plan_binding(
    device: str,
    rank: int,
    world_size: int,
    device_ids: Sequence[int] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    run: Runner = run_tool,
    sysfs_root: str | os.PathLike = "/",
    cuda_bus: Callable[[int], str] = cuda_pci_bus,
    allowed: Sequence[int] | None = None,
) -> CpuBinding:
    """Which CPUs rank ``rank`` of ``world_size`` should run on; unbound (one warning logged) when that cannot be found.

    ``device_ids`` are the job's device indices in rank order (default
    ``0..world_size-1``); ``env`` defaults to ``os.environ``; ``run``,
    ``sysfs_root`` (read on CUDA, and on NPU when lspci cannot say),
    ``cuda_bus`` and ``allowed`` let tests replace the system.  A malformed
    ``CPU_BINDING_NUM`` is a :class:`UserError`.
    """
    env = os.environ if env is None else env
    ids = list(range(world_size)) if device_ids is None else [int(d) for d in device_ids]
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if device != "cpu" and len(ids) < world_size:
        raise UserError(f"device_ids {ids} lists {len(ids)} devices for world size {world_size}")
    label = "cpu" if device == "cpu" else f"{device}:{ids[rank]}"
    try:
        if device == "npu":
            cpus, node, how = _plan_npu(rank, ids[:world_size], env, run, Path(sysfs_root))
        elif device == "cuda":
            cpus, node, how = _plan_cuda(rank, ids[:world_size], env, Path(sysfs_root), cuda_bus)
        elif device == "cpu":
            cpus, node, how = _plan_cpu(rank, world_size, allowed_cpus() if allowed is None else sorted(allowed))
        else:
            raise BindingFailed(f"no binding rule for device type {device!r}")
    except BindingFailed as exc:
        return _unbound(rank, label, str(exc))
    except (ValueError, IndexError, KeyError, RuntimeError) as exc:
        if isinstance(exc, UserError):
            raise
        # Tool output in a shape we did not expect, or torch unable to name a
        # GPU's bus: a speed matter, not fatal.
        return _unbound(rank, label, f"{type(exc).__name__}: {exc}")
    return CpuBinding(rank, label, tuple(cpus), node, how)


def _unbound(rank: int, label: str, reason: str) -> CpuBinding:
    binding = CpuBinding(rank, label, None, None, "", f"CPU binding skipped: {reason}")
    log.warning("rank %d (%s): %s; running unbound", rank, label, binding.warning)
    return binding


def unbound(rank: int, device_label: str, why: str = "bind_cpu=0") -> CpuBinding:
    """The record of a rank left unbound on purpose (no warning)."""
    return CpuBinding(rank, device_label, None, None, why, None)


def apply_binding(binding: CpuBinding, *, pid: int = 0) -> CpuBinding:
    """Pin process ``pid`` (0: this one) to ``binding.cpus``; on failure log one warning and return it unbound."""
    if binding.cpus is None:
        return binding
    try:
        os.sched_setaffinity(pid, binding.cpus)
    except (OSError, ValueError, AttributeError) as exc:
        # AttributeError: no sched_setaffinity (not Linux).
        return _unbound(binding.rank, binding.device, f"setting affinity {format_cpu_list(binding.cpus)} failed: {exc}")
    return binding


def bind_rank(
    device: str,
    rank: int,
    world_size: int,
    device_ids: Sequence[int] | None = None,
    *,
    enabled: bool = True,
    **plan_kwargs,
) -> CpuBinding:
    """Plan and apply this process's binding as rank ``rank`` (call before loading the model)."""
    if not enabled:
        ids = list(range(world_size)) if device_ids is None else list(device_ids)
        return unbound(rank, "cpu" if device == "cpu" else f"{device}:{ids[rank]}")
    return apply_binding(plan_binding(device, rank, world_size, device_ids, **plan_kwargs))
