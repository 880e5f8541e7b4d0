"""The thread policy: who chooses torch's thread count, the CPUs a process may use, OpenMP's wait policy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vicap import runtime

REPO = Path(__file__).resolve().parents[1]
POLICY_VARIABLES = ("VICAP_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", *runtime.WAIT_VARIABLES)
CPUS = runtime.CPUS_SOURCE


@pytest.mark.parametrize(
    "case, threads, environ, torch_threads, expected",
    [
        ("nothing set: the CPUs available", None, {}, None, (5, CPUS)),
        ("empty variable counts as unset", None, {"VICAP_THREADS": ""}, None, (5, CPUS)),
        ("explicit option", 3, {}, None, (3, "--threads")),
        ("option over VICAP_THREADS", 2, {"VICAP_THREADS": "1"}, None, (2, "--threads")),
        ("VICAP_THREADS", None, {"VICAP_THREADS": "1"}, None, (1, "VICAP_THREADS")),
        ("VICAP_THREADS over OMP_NUM_THREADS", None, {"VICAP_THREADS": "2", "OMP_NUM_THREADS": "1"}, None, (2, "VICAP_THREADS")),
        ("user's OMP_NUM_THREADS over the default", None, {"OMP_NUM_THREADS": "3"}, None, (3, "OMP_NUM_THREADS")),
        ("MKL_NUM_THREADS over OMP_NUM_THREADS, as torch reads them", None, {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "1"}, None, (1, "MKL_NUM_THREADS")),
        ("OpenMP nesting list: the first level", None, {"OMP_NUM_THREADS": "4,2"}, None, (4, "OMP_NUM_THREADS")),
        ("torch imported first: its setting", None, {"OMP_NUM_THREADS": "1"}, 3, (3, "torch.get_num_threads() (torch was imported first)")),
        ("option over torch's setting", 2, {}, 3, (2, "--threads")),
    ],
)  # fmt: skip
def test_who_chooses_the_thread_count(case, threads, environ, torch_threads, expected) -> None:
    assert runtime.resolve_threads(threads, environ, torch_threads=torch_threads, cpus=5) == expected, case


@pytest.mark.parametrize(
    "case, threads, environ, message",
    [
        ("zero option", 0, {}, "--threads = 0"),
        ("negative option", -2, {}, "--threads = -2"),
        ("text option", "two", {}, "--threads = 'two'"),
        ("zero VICAP_THREADS", None, {"VICAP_THREADS": "0"}, "VICAP_THREADS = '0'"),
        ("text VICAP_THREADS", None, {"VICAP_THREADS": "many"}, "VICAP_THREADS = 'many'"),
        ("fraction VICAP_THREADS", None, {"VICAP_THREADS": "1.5"}, "VICAP_THREADS = '1.5'"),
        ("text OMP_NUM_THREADS", None, {"OMP_NUM_THREADS": "all"}, "OMP_NUM_THREADS = 'all'"),
        ("zero MKL_NUM_THREADS", None, {"MKL_NUM_THREADS": "0"}, "MKL_NUM_THREADS = '0'"),
    ],
)
def test_bad_thread_counts_name_the_setting(case, threads, environ, message) -> None:
    with pytest.raises(ValueError, match="must be a whole number >= 1") as e:
        runtime.resolve_threads(threads, environ, torch_threads=None, cpus=2)
    assert message in str(e.value), case


@pytest.mark.parametrize(
    "case, v2, v1, expected",
    [
        ("no cgroup files", None, None, None),
        ("v2 without quota", "max 100000\n", None, None),
        ("v2 two CPUs", "200000 100000\n", None, 2),
        ("v2 1.5 CPUs rounds up", "150000 100000\n", None, 2),
        ("v2 half a CPU is one", "50000 100000\n", None, 1),
        ("v2 unreadable format", "lots\n", None, None),
        ("v1 without quota", None, ("-1\n", "100000\n"), None),
        ("v1 three CPUs", None, ("300000\n", "100000\n"), 3),
        ("v2 wins over v1", "100000 100000\n", ("300000\n", "100000\n"), 1),
    ],
)
def test_cgroup_cpu_quota(tmp_path, case, v2, v1, expected) -> None:
    v2_path, v1_paths = tmp_path / "cpu.max", (tmp_path / "quota", tmp_path / "period")
    if v2 is not None:
        v2_path.write_text(v2)
    if v1 is not None:
        v1_paths[0].write_text(v1[0])
        v1_paths[1].write_text(v1[1])
    assert runtime.cgroup_cpu_limit(v2_path, v1_paths) == expected, case


@pytest.mark.parametrize(
    "case, mask, quota, expected",
    [
        ("affinity mask, not the machine's cores", {0, 3}, None, 2),
        ("quota below the mask", {0, 1, 2, 3}, 1, 1),
        ("quota above the mask", {5}, 4, 1),
    ],
)
def test_available_cpus(monkeypatch, case, mask, quota, expected) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: mask, raising=False)
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: quota)
    assert runtime.available_cpus() == expected, case


@pytest.fixture
def clean_policy(monkeypatch):
    """No policy variables from the outside; torch's thread count and the recorded policy restored."""
    for name in POLICY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "_ACTIVE", None)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_applied_after_torch_is_imported(clean_policy, monkeypatch) -> None:
    # In this process torch is already loaded: the thread count applies, the wait policy only to children.
    assert runtime.thread_policy() is None
    policy = runtime.apply_thread_policy(1)
    assert torch.get_num_threads() == 1
    assert policy["threads"] == 1 and policy["threads_source"] == "--threads"
    assert policy["wait_policy"] == {"OMP_WAIT_POLICY": "PASSIVE"} and policy["wait_policy_source"] == "vicap"
    assert policy["wait_policy_effective"] is False
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert runtime.thread_policy() == policy
    assert (
        policy["torch_threads"] == 1 and policy["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    )
    policy["threads"] = 99  # a copy: the recorded policy does not change
    assert runtime.thread_policy()["threads"] == 1


def test_users_wait_policy_is_kept(clean_policy, monkeypatch) -> None:
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    policy = runtime.apply_thread_policy(None)
    assert "OMP_WAIT_POLICY" not in os.environ
    assert policy["wait_policy"] == {"GOMP_SPINCOUNT": "1000"}
    assert policy["wait_policy_source"] == "user environment"
    assert policy["wait_policy_effective"] is True  # the user's, there when torch loaded OpenMP
    assert policy["threads_source"].startswith("torch.get_num_threads()")


# The real command in a fresh interpreter: the policy is applied before torch is imported, so OpenMP's
# own report of its settings at load time (OMP_DISPLAY_ENV) shows them; then torch's thread count.
FRESH = """
import sys
from vicap.cli import main

sys.argv = ["vicap", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    if e.code:
        raise
import torch

print("TORCH-THREADS", torch.get_num_threads())
"""


def run_cli(args: list[str], environ: dict[str, str], one_cpu: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in POLICY_VARIABLES}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_DISPLAY_ENV="VERBOSE", **environ)
    first_cpu = min(os.sched_getaffinity(0))
    return subprocess.run(
        [sys.executable, "-c", FRESH, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=(lambda: os.sched_setaffinity(0, {first_cpu})) if one_cpu else None,
    )


@pytest.mark.parametrize(
    "case, args, environ, one_cpu, threads",
    [
        ("--threads 1", ["--threads", "1", "list"], {}, False, 1),
        ("VICAP_THREADS=1", ["list"], {"VICAP_THREADS": "1"}, False, 1),
        ("--threads over OMP_NUM_THREADS", ["--threads", "1", "list"], {"OMP_NUM_THREADS": "2"}, False, 1),
        ("the affinity mask (taskset; libgomp's own default agrees)", ["list"], {}, True, 1),
        ("the user's OMP_NUM_THREADS", ["list"], {"OMP_NUM_THREADS": "2"}, True, 2),
    ],
)
def test_cli_runs_torch_with_the_chosen_threads(case, args, environ, one_cpu, threads) -> None:
    res = run_cli(args, environ, one_cpu)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"TORCH-THREADS {threads}" in res.stdout, (case, res.stdout[-500:])
    # libgomp (torch's Linux wheels) reports the settings it read when torch loaded it.
    if "GOMP_SPINCOUNT" in res.stderr:
        assert f"OMP_NUM_THREADS = '{threads}'" in res.stderr, case
        assert "GOMP_SPINCOUNT = '0'" in res.stderr, case  # passive: no spinning


def test_cli_bad_thread_count_is_a_clear_error() -> None:
    res = run_cli(["list"], {"VICAP_THREADS": "lots"})
    assert res.returncode == 2
    assert "error: VICAP_THREADS = 'lots': the thread count must be a whole number >= 1" in res.stderr
    assert "Traceback" not in res.stderr
