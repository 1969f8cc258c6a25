"""Machine defaults: torch threads and dataloader workers follow the cores the process may use, overrides win,
and the training loop runs with the chosen threads."""
from __future__ import annotations

import types

import pytest
import torch

from medtune.paths import recipe_path
from medtune.train import machine
from medtune.train.recipe import load_recipe


def test_usable_cores_are_the_affinity_capped_by_the_quota_rounded_up():
    assert machine.usable_cores(affinity=8, quota=None) == 8
    assert machine.usable_cores(affinity=8, quota=1.5) == 2
    assert machine.usable_cores(affinity=2, quota=16.0) == 2
    assert machine.usable_cores(affinity=4, quota=0.2) == 1


def test_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert machine.cgroup_cpu_limit(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert machine.cgroup_cpu_limit(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert machine.cgroup_cpu_limit(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert machine.cgroup_cpu_limit(v1) is None
    assert machine.cgroup_cpu_limit(tmp_path / "missing") is None


@pytest.mark.parametrize("cores", [1, 2, 6, 32])
def test_threads_follow_the_cores_given(cores):
    assert machine.torch_threads(cores=cores, environ={}, current=64) == cores
    # each dataloader worker takes a core; never fewer than one thread
    assert machine.torch_threads(cores=cores, workers=2, environ={}, current=64) == max(1, cores - 2)
    # processes on one machine share its cores
    assert machine.torch_threads(cores=cores, environ={"LOCAL_WORLD_SIZE": "2"}, current=64) == max(1, cores // 2)
    # never more than the process runs already (torch counts physical cores; a caller may have chosen fewer)
    assert machine.torch_threads(cores=cores, environ={}, current=1) == 1


def test_the_override_wins_over_the_environment_and_the_cores():
    environ = {machine.THREADS_ENV: "3", "OMP_NUM_THREADS": "5"}
    assert machine.torch_threads(1, cores=16, environ=environ) == 1
    assert machine.torch_threads(cores=16, environ=environ) == 3
    assert machine.torch_threads(cores=16, environ={"OMP_NUM_THREADS": "5"}) == 5
    with pytest.raises(ValueError, match="at least 1"):
        machine.torch_threads(0, cores=4, environ={})


def test_workers_are_none_on_a_cpu_and_a_few_for_a_gpu():
    assert machine.dataloader_workers(cuda=False, cores=64, environ={}) == 0
    assert machine.dataloader_workers(cuda=True, cores=2, environ={}) == 1
    assert machine.dataloader_workers(cuda=True, cores=64, environ={}) == machine.MAX_GPU_WORKERS
    assert machine.dataloader_workers(cuda=True, cores=1, environ={}) == 0
    assert machine.dataloader_workers(cuda=False, cores=8, environ={machine.WORKERS_ENV: "2"}) == 2
    assert machine.dataloader_workers(3, cuda=False, cores=8, environ={machine.WORKERS_ENV: "2"}) == 3


def test_a_recipe_override_reaches_the_training_arguments(tmp_path, monkeypatch):
    from medtune.train.run import training_arguments

    monkeypatch.delenv(machine.THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(machine, "usable_cores", lambda **_: 7)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)

    def arguments(*overrides):
        recipe = load_recipe(recipe_path("demo"), list(overrides))
        args = training_arguments(recipe, recipe.stages[1], tmp_path, None)
        return args.torch_threads, args.dataloader_num_workers, args.adapt_threads

    assert arguments() == (7, 0, False)   # the default is fixed: a resumed run gives identical weights
    assert arguments("stages.*.torch_threads=1", "stages.*.dataloader_workers=1") == (1, 1, False)
    assert arguments("stages.*.torch_threads=free") == (7, 0, True)
    monkeypatch.setenv(machine.THREADS_ENV, "3")   # the environment sets the count too; the stage wins
    assert arguments() == (3, 0, False) and arguments("stages.*.torch_threads=2") == (2, 0, False)
    monkeypatch.setenv(machine.THREADS_ENV, "free")
    assert arguments() == (7, 0, True)


def test_free_is_the_only_word_torch_threads_take(tmp_path):
    from medtune.train.recipe import RecipeError

    with pytest.raises(RecipeError, match="torch_threads"):
        load_recipe(recipe_path("demo"), ["stages.*.torch_threads=many"])
    with pytest.raises(ValueError, match="whole number or free"):
        machine.torch_threads(cores=2, environ={machine.THREADS_ENV: "many"})


def test_training_runs_with_the_chosen_threads_and_restores_them(monkeypatch):
    from transformers import Trainer

    from medtune.train.trainer import MedtuneTrainer

    monkeypatch.setattr(Trainer, "train", lambda self, *a, **k: torch.get_num_threads())
    before = torch.get_num_threads()
    chosen = 1 if before != 1 else 2
    trainer = object.__new__(MedtuneTrainer)
    trainer.args = types.SimpleNamespace(torch_threads=chosen, adapt_threads=False)
    assert trainer.train() == chosen
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("ceiling, others, machine_cores, threads", [
    (2, 0.0, 2, 2), (2, 0.2, 2, 2), (2, 0.3, 2, 1), (2, 1.0, 2, 1), (2, 3.0, 2, 1),
    (4, 1.1, 4, 3), (4, 1.3, 4, 2), (8, 1.5, 16, 8), (8, 9.6, 16, 6)])
def test_threads_leave_the_cores_other_processes_keep_busy(ceiling, others, machine_cores, threads):
    assert machine.threads_for_free_cores(ceiling, others, machine_cores) == threads


def test_the_governor_follows_the_load_between_intervals(monkeypatch):
    """A fake machine: (busy CPU seconds of every process, of this one) read at fake times."""
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    readings = iter([(0.0, 0.0), (1.0, 0.5),      # start: others keep one core busy -> 1 of 2 threads
                     (21.0, 20.5)])               # 20 s later: only this process is busy -> 2 threads
    times = iter([0.0, 1.0, 3.0, 21.0])
    before = torch.get_num_threads()
    governor = machine.ThreadGovernor(2, interval=15.0, sample=lambda: next(readings), clock=lambda: next(times),
                                      machine_cores=2)
    try:
        assert governor.start() == 1 and torch.get_num_threads() == 1
        assert governor.update() is None                 # 2 s after: too soon, nothing read
        assert governor.update() == 2 and torch.get_num_threads() == 2
        assert governor.choices == [1, 2]
    finally:
        torch.set_num_threads(before)


def test_a_governor_without_proc_stat_keeps_the_ceiling():
    before = torch.get_num_threads()
    governor = machine.ThreadGovernor(1, sample=lambda: None)
    try:
        assert governor.start() == 1 and governor.update() is None
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("environ", [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"},
                                     {"ONEDNN_MAX_CPU_ISA": "avx512_core"}])
def test_an_instruction_set_cap_below_avx512_bf16_means_no_native_bf16(environ):
    from medtune.train.machine import bf16_native

    assert bf16_native(environ) is False   # whatever /proc/cpuinfo says: the capped kernels have no bf16


def test_without_a_cap_native_bf16_is_what_the_cpu_reports():
    from pathlib import Path

    from medtune.train.machine import bf16_native

    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    assert bf16_native({}) == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert bf16_native({"ONEDNN_MAX_CPU_ISA": "ALL"}) == bf16_native({})
