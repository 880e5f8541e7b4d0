"""How many CPU threads torch uses, and how its idle OpenMP threads wait.

torch's CPU build runs its parallel kernels (and MKL's) on an OpenMP team: GNU libgomp in the Linux
wheels (torch/lib/libgomp.so.1), LLVM/Intel libomp in some other builds. Two defaults hurt on a
machine shared with other work:
- the team has one thread per CPU of the affinity mask (libgomp's default; other runtimes count every
  core) and ignores a cgroup CPU quota (`docker run --cpus 2`, a Kubernetes CPU limit), so a container
  limited to 2 CPUs on a 64-core host runs 64 threads that take turns;
- a thread that finishes its share of a parallel region spins (libgomp: GOMP_SPINCOUNT = 300,000
  iterations) waiting for the next one or for a teammate. When the teammate has lost its core to
  another process, the spinning burns the very CPU the teammate needs.

`apply_thread_policy` fixes both: the thread count is the CPUs this process may use (unless the user
chose one), and idle threads sleep at once (OMP_WAIT_POLICY=PASSIVE: libgomp then spins 0 times, libomp
uses a block time of 0; libgomp ignores KMP_BLOCKTIME). The OpenMP runtime reads its environment once,
when it is loaded, i.e. at `import torch`: the policy is complete only when applied before that. The
`vicap` command applies it first thing; `import vicap` does not import torch, so a library user can
call it right after `import vicap`. Applied after `import torch`, only the thread count takes effect.

Who decides the thread count, first match wins: an explicit `threads` argument (`vicap --threads N`),
the VICAP_THREADS environment variable, the user's own torch setting (MKL_NUM_THREADS or
OMP_NUM_THREADS before torch is imported, torch.get_num_threads() after), then the CPUs available.
A user's OMP_WAIT_POLICY, GOMP_SPINCOUNT or KMP_BLOCKTIME is left as it is.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

from vicap.errors import UsageError

log = logging.getLogger(__name__)

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
CGROUP_V2_QUOTA = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))

CPUS_SOURCE = "CPUs available (affinity mask, cgroup quota)"
_ACTIVE: dict | None = None


def cgroup_cpu_limit(v2: Path = CGROUP_V2_QUOTA, v1: tuple[Path, Path] = CGROUP_V1_QUOTA) -> int | None:
    """CPUs allowed by the cgroup's CPU quota (rounded up), or None without a quota or a readable file."""
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
        elif v1[0].is_file() and v1[1].is_file():
            quota, period = v1[0].read_text().strip(), v1[1].read_text().strip()
        else:
            return None
        if quota in ("max", "-1"):
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError) as e:  # an unexpected format: no quota rather than a failed start
        log.debug("cannot read the cgroup CPU quota: %s", e)
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform (macOS, Windows)
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return min(cpus, limit) if limit else cpus


def _positive(value: str | int, name: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise UsageError(f"{name} = {value!r}: the thread count must be a whole number >= 1")
    return n


def resolve_threads(
    threads: int | None, environ: dict[str, str] | os._Environ, *, torch_threads: int | None, cpus: int
) -> tuple[int, str]:
    """(thread count, who chose it), first match wins: `threads`, VICAP_THREADS, the user's torch setting
    (`torch_threads` once torch is imported, else MKL_NUM_THREADS / OMP_NUM_THREADS, which torch reads in
    that order), `cpus`. A bad value is a ValueError naming the setting."""
    if threads is not None:
        return _positive(threads, "--threads"), "--threads"
    if environ.get("VICAP_THREADS"):
        return _positive(environ["VICAP_THREADS"], "VICAP_THREADS"), "VICAP_THREADS"
    if torch_threads is not None:
        return torch_threads, "torch.get_num_threads() (torch was imported first)"
    for name in ("MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        if environ.get(name):  # OpenMP allows a list per nesting level ("4,2"); the first is this level's
            return _positive(environ[name].split(",")[0].strip(), name), name
    return cpus, CPUS_SOURCE


def apply_thread_policy(threads: int | None = None) -> dict:
    """Choose and apply the thread count and OpenMP wait policy (see the module docstring); returns
    `thread_policy()`. Raises ValueError naming the setting for a bad thread count."""
    global _ACTIVE
    torch_loaded = "torch" in sys.modules
    torch_threads = sys.modules["torch"].get_num_threads() if torch_loaded else None
    cpus = available_cpus()
    n, source = resolve_threads(threads, os.environ, torch_threads=torch_threads, cpus=cpus)
    user_wait = [k for k in WAIT_VARIABLES if os.environ.get(k)]
    if not user_wait:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # inherited by child processes too
    if source in ("--threads", "VICAP_THREADS", CPUS_SOURCE):  # vicap's choice, not the user's torch setting
        if torch_loaded:
            sys.modules["torch"].set_num_threads(n)
        else:
            # torch reads these when it is imported, MKL_NUM_THREADS over OMP_NUM_THREADS
            os.environ["OMP_NUM_THREADS"] = str(n)
            if "MKL_NUM_THREADS" in os.environ:
                os.environ["MKL_NUM_THREADS"] = str(n)
    _ACTIVE = {
        "threads": n,
        "threads_source": source,
        "cpus_available": cpus,
        "wait_policy": {k: os.environ[k] for k in WAIT_VARIABLES if os.environ.get(k)},
        "wait_policy_source": "user environment" if user_wait else "vicap",
        # in force in this process: set before torch loaded OpenMP (a user's own is taken to be)
        "wait_policy_effective": bool(user_wait) or not torch_loaded,
    }
    log_thread_policy()
    return thread_policy()


def log_thread_policy() -> None:
    """Log the applied policy at DEBUG (the CLI applies it before it configures logging)."""
    p = _ACTIVE
    if p is None:
        return
    log.debug(
        "threads: %d (%s; %d CPU(s) available); OpenMP wait policy %s from %s%s",
        p["threads"],
        p["threads_source"],
        p["cpus_available"],
        p["wait_policy"],
        p["wait_policy_source"],
        "" if p["wait_policy_effective"] else " (torch was already imported: only child processes get it)",
    )
    if p["threads"] > p["cpus_available"]:
        log.debug(
            "%d threads on %d available CPU(s): they will wait for each other",
            p["threads"],
            p["cpus_available"],
        )


def thread_policy() -> dict | None:
    """The policy `apply_thread_policy` applied in this process (a copy), or None if it was not called.

    Once torch is imported it also holds what torch runs with: `torch_threads` and `cpu_capability`
    (the SIMD level of ATen's kernels, e.g. AVX512 or AVX2; ATEN_CPU_CAPABILITY lowers it). Results
    are bit-identical only between runs that agree on both (README, "The demo")."""
    if _ACTIVE is None:
        return None
    policy = {**_ACTIVE, "wait_policy": dict(_ACTIVE["wait_policy"])}
    torch = sys.modules.get("torch")
    if torch is not None:
        policy["torch_threads"] = torch.get_num_threads()
        policy["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return policy
