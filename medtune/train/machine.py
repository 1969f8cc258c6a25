"""Machine defaults for training: how many CPU cores this process may use, and the torch threads and dataloader
workers chosen from them.

Design choices:

* Usable cores are the CPUs the process is allowed to run on (``os.sched_getaffinity``: taskset, cpusets,
  Slurm, Kubernetes CPU pinning), capped by a cgroup CPU quota (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us``
  in v1: Docker's ``--cpus``, Kubernetes limits) rounded up. ``os.cpu_count()`` counts the host's cores and
  would oversubscribe a container.
* On a CPU, batches are collated from the token cache in the main process: a dataloader worker costs a core
  that a torch thread would use better (measured on 2 cores: 2 workers beside 2 threads cost about 20% of the
  samples/s), so workers default to 0 and torch threads to every usable core (capped by torch's own setting,
  which counts physical cores, so hyper-threads are not oversubscribed and a lower choice made earlier in the
  process stands). With a GPU, the cores feed it:
  workers default to a few (capped at 4), one core kept for the main process.
* Each setting is overridable, first wins: the stage's field (recipe YAML or ``stages.*.torch_threads=N`` on
  the command line), then ``MEDTUNE_TORCH_THREADS`` / ``MEDTUNE_DATALOADER_WORKERS``, then (threads only)
  ``OMP_NUM_THREADS`` as a launcher such as torchrun sets it, then the cores-based default.
* Several processes on one machine (``LOCAL_WORLD_SIZE`` under torchrun) share the cores evenly.
* On a shared machine, cores other programs keep busy are not available: torch's threads meet at a barrier
  after every operation, so one thread that waits for a core stalls the others (measured on 2 cores beside
  another busy process: 2 threads ran a training step 2.7x slower than 1). With ``torch_threads: free`` (or
  ``MEDTUNE_TORCH_THREADS=free``), :class:`ThreadGovernor` measures how busy the other processes keep the
  machine (``/proc/stat`` less this process's own CPU time) when training starts and every ``interval`` seconds
  after, and runs on the cores left, between 1 and the cores-based default. It is not the default because the
  thread count changes the order of floating-point sums: two runs under different loads (a run and its resumed
  copy) then differ in the last bits of their weights, where the fixed default gives identical ones.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

THREADS_ENV, WORKERS_ENV = "MEDTUNE_TORCH_THREADS", "MEDTUNE_DATALOADER_WORKERS"
FREE = "free"   # torch_threads: follow the cores other processes leave free
MAX_GPU_WORKERS = 4
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The cgroup's CPU quota in cores (e.g. 1.5), or None when there is no limit or no cgroup to read."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]   # cgroup v2: "max 100000" or "150000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:   # cgroup v1: a quota of -1 means no limit
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores(*, affinity: int | None = None, quota: float | None | str = "read") -> int:
    """CPU cores this process may use: its affinity set, capped by the cgroup quota (rounded up); at least 1.

    ``affinity`` and ``quota`` replace what the machine reports (for tests)."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit() if quota == "read" else quota
    cores = affinity if limit is None else min(affinity, math.ceil(limit))
    return max(1, cores)


def _from_env(name: str, environ: Mapping[str, str], *, words: tuple[str, ...] = ()) -> int | str | None:
    text = environ.get(name, "").strip()
    if not text:
        return None
    if text in words:
        return text
    try:
        value = int(text)
    except ValueError:
        allowed = " or ".join(("a whole number", *words))
        raise ValueError(f"{name}={text!r}: expected {allowed}") from None
    return value


def _cores_per_process(cores: int, environ: Mapping[str, str]) -> int:
    processes = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // processes)


def dataloader_workers(requested: int | None = None, *, cuda: bool, cores: int | None = None,
                       environ: Mapping[str, str] | None = None) -> int:
    """Dataloader workers for training: ``requested`` if given, else the environment, else from the cores."""
    environ = os.environ if environ is None else environ
    for value in (requested, _from_env(WORKERS_ENV, environ)):
        if value is not None:
            if value < 0:
                raise ValueError(f"dataloader workers must be 0 or more, got {value}")
            return value
    if not cuda:
        return 0
    share = _cores_per_process(cores if cores is not None else usable_cores(), environ)
    return min(MAX_GPU_WORKERS, share - 1)


def torch_threads(requested: int | str | None = None, *, workers: int = 0, cores: int | None = None,
                  environ: Mapping[str, str] | None = None, current: int | None = None) -> int:
    """Torch intra-op threads for training (with ``free``: the most a :class:`ThreadGovernor` runs): ``requested``
    if a number, else ``MEDTUNE_TORCH_THREADS``, else ``OMP_NUM_THREADS``, else this process's share of the
    usable cores less one per dataloader worker, never more than the process runs now (``current``, default
    ``torch.get_num_threads()``: torch's own default counts physical cores, and a caller that lowered it, say
    to one thread for reproducible tests, keeps its choice)."""
    environ = os.environ if environ is None else environ
    value = explicit_threads(requested, environ=environ)
    if value is not None:
        if value < 1:
            raise ValueError(f"torch threads must be at least 1, got {value}")
        return value
    if current is None:
        import torch

        current = torch.get_num_threads()
    share = _cores_per_process(cores if cores is not None else usable_cores(), environ)
    return max(1, min(current, share - workers))


def explicit_threads(requested: int | str | None = None, *, environ: Mapping[str, str] | None = None) -> int | None:
    """The thread count someone set (the stage, ``MEDTUNE_TORCH_THREADS``, ``OMP_NUM_THREADS``), or None."""
    environ = os.environ if environ is None else environ
    if requested == FREE:
        return None
    for value in (requested, _from_env(THREADS_ENV, environ, words=(FREE,)), _from_env("OMP_NUM_THREADS", environ)):
        if value == FREE:
            return None
        if value is not None:
            return value
    return None


def adapts_threads(requested: int | str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the threads follow the free cores (``free`` from the stage, or from ``MEDTUNE_TORCH_THREADS`` when
    the stage sets nothing)."""
    environ = os.environ if environ is None else environ
    if requested is not None:
        return requested == FREE
    return _from_env(THREADS_ENV, environ, words=(FREE,)) == FREE


def threads_for_free_cores(ceiling: int, others_busy: float, machine_cores: int) -> int:
    """Threads to run when other processes keep ``others_busy`` of the machine's cores busy: the cores left (a
    core busy a quarter of the time or more counts as taken), between 1 and ``ceiling``."""
    taken = max(0, math.ceil(others_busy - 0.25))
    return max(1, min(ceiling, machine_cores - taken))


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy or stolen, CPU seconds of this process), or None when
    ``/proc/stat`` cannot be read (not Linux)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]   # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


class ThreadGovernor:
    """Chooses torch's threads from the cores other processes leave free (see the module docstring)."""

    def __init__(self, ceiling: int, *, interval: float = 15.0, sample=cpu_seconds, clock=None,
                 machine_cores: int | None = None):
        import time

        self.ceiling, self.interval, self.sample = ceiling, interval, sample
        self.machine_cores = machine_cores or os.cpu_count() or ceiling   # /proc/stat counts every core
        self.clock = clock or time.monotonic
        self.last: tuple[float, tuple[float, float]] | None = None
        self.choices: list[int] = []

    def start(self, settle: float = 0.1) -> int:
        """First choice, from ``settle`` seconds of watching the machine."""
        import time

        reading = self.sample()
        if reading is None:
            return self._set(self.ceiling)
        self.last = (self.clock(), reading)
        time.sleep(settle)
        return self.update(force=True)

    def update(self, *, force: bool = False) -> int | None:
        """Re-choose when ``interval`` seconds have passed since the last choice; the new count, or None."""
        if self.last is None:
            return None
        now = self.clock()
        if not force and now - self.last[0] < self.interval:
            return None
        reading = self.sample()
        (then, (busy_then, own_then)), (busy_now, own_now) = self.last, reading
        self.last = (now, reading)
        elapsed = max(now - then, 1e-6)
        others = max(0.0, (busy_now - busy_then) - (own_now - own_then)) / elapsed
        return self._set(threads_for_free_cores(self.ceiling, others, self.machine_cores))

    def _set(self, threads: int) -> int:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self.choices.append(threads)
        return threads


@contextlib.contextmanager
def using_threads(threads: int) -> Iterator[int]:
    """Run the block with ``threads`` torch intra-op threads, restoring the previous count after it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


# Instruction sets below AVX512-BF16 that oneDNN and ATen accept as caps (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY)
_ISA_WITHOUT_BF16 = {"sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni",
                     "default", "avx512"}


SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")   # what decides fp32 and bf16 speed on a CPU
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_flags() -> list[str]:
    """The :data:`SIMD_FLAGS` this CPU reports (empty where /proc/cpuinfo cannot be read)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [flag for flag in SIMD_FLAGS if flag in flags]


def isa_caps(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The instruction-set caps set in the environment (ATen, oneDNN, MKL), e.g. ``{"ATEN_CPU_CAPABILITY": "avx2"}``."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in ISA_CAPS if environ.get(name, "").strip()}


def bf16_native(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast can be faster.

    A cap on the instruction sets torch may use (``ATEN_CPU_CAPABILITY=avx2`` or ``ONEDNN_MAX_CPU_ISA=AVX2``,
    how a machine with AVX512 runs the kernels of an AVX2-only one) counts: under it bf16 is not native."""
    if any(cap.strip().lower() in _ISA_WITHOUT_BF16 for cap in isa_caps(environ).values()):
        return False
    return any(flag in cpu_flags() for flag in ("avx512_bf16", "amx_bf16"))
