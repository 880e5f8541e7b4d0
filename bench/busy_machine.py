"""The demo's training stage on a quiet machine and beside one competing CPU-bound process.

What is timed: `python -m vicap.cli train` on the demo recipe (demo_vi_synthetic.toml), a fresh child
process per run, into a fresh run directory. The demo's synthetic data and stand-in models are built
once under --dir by vicap.demo's own functions and the feature store is filled once (an untimed
`vicap features`), so every timed run does the same work: load the models, train, save.

Each round runs the training quiet, then again while a competitor spins: a second Python process in a
busy loop (`while True: pass`, one thread), started before the training and killed after it. Per run
it reports wall seconds and the training child's CPU seconds (user + sys, from os.wait4, so the
competitor is not counted), and the contended/quiet ratios. Targets: contended wall <= 2x quiet wall,
contended CPU seconds <= 1.3x quiet. The final training loss of each run is printed too: with the same
thread count, quiet and contended runs must train identically.

--vicap-root runs the training from another vicap checkout (e.g. an older commit, to measure before
and after a change); --env K=V sets environment variables for the training child only (e.g.
--env VICAP_THREADS=1, --env GOMP_SPINCOUNT=300000). Take the CPU lock for the whole run: the
competitor is part of the bench.

    flock /tmp/cpu.lock python bench/busy_machine.py [--dir DIR] [--epochs 2] [--rounds 1]
        [--vicap-root PATH] [--env K=V ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUSY_LOOP = "while True: pass"


def child_env(vicap_root: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(vicap_root), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**env, **extra}


def wait_with_usage(proc: subprocess.Popen) -> tuple[int, float]:
    """Reap `proc`; returns (exit code, its user + sys CPU seconds)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def run_vicap(args: list[str], env: dict[str, str], log_path: Path) -> tuple[float, float]:
    """Run `python -m vicap.cli ARGS` in the vicap checkout first on env's PYTHONPATH (`python -m` puts
    the working directory first on sys.path); returns (wall seconds, CPU seconds). Exits on failure."""
    root = env["PYTHONPATH"].split(os.pathsep)[0]
    with log_path.open("w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "vicap.cli", *args],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        code, cpu = wait_with_usage(proc)
        wall = time.perf_counter() - t0
    if code != 0:
        sys.exit(f"vicap {' '.join(args[:2])} failed (exit {code}):\n{log_path.read_text()[-3000:]}")
    return wall, cpu


def final_loss(run_dir: Path) -> float | None:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line]
    losses = [r["loss"] for r in rows if "loss" in r]
    return losses[-1] if losses else None


def timed_train(work: Path, name: str, base_args: list[str], env: dict[str, str], busy: bool) -> dict:
    run_dir = work / "runs" / f"bench-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    competitor = None
    if busy:
        competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
        time.sleep(0.5)  # let it reach its loop before the training starts
    try:
        wall, cpu = run_vicap([*base_args, f"train.output_dir={run_dir}"], env, work / f"bench-{name}.log")
    finally:
        if competitor is not None:
            competitor.send_signal(signal.SIGKILL)
            wait_with_usage(competitor)
    return {"run": name, "wall_s": wall, "cpu_s": cpu, "loss": final_loss(run_dir)}


def main() -> None:
    from vicap.demo import build_demo_inputs, demo_overrides, demo_recipe_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dir", type=Path, help="where the demo's data, stand-ins and runs go (default: a temp dir)"
    )
    p.add_argument("--epochs", type=int, help="train.epochs for the timed runs (default: the demo recipe's)")
    p.add_argument("--rounds", type=int, default=1, help="quiet + contended pairs")
    p.add_argument("--vicap-root", type=Path, default=REPO, help="vicap checkout to train with")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment for the training")
    args = p.parse_args()
    if bad := [kv for kv in args.env if "=" not in kv]:
        p.error(f"--env takes K=V, got {bad[0]!r}")
    extra = dict(kv.split("=", 1) for kv in args.env)
    work = args.dir or Path(tempfile.mkdtemp(prefix="vicap-busy-"))
    work.mkdir(parents=True, exist_ok=True)

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; work dir {work}")
    print(f"training with vicap from {args.vicap_root}; extra environment: {extra or 'none'}")
    t = time.perf_counter()
    build_demo_inputs(work, progress=False)
    recipe = str(demo_recipe_path())
    # each timed run gets its own train.output_dir
    overrides = [o for o in demo_overrides(work) if not o.startswith("train.output_dir=")]
    overrides += [f"train.epochs={args.epochs}"] if args.epochs else []
    env = child_env(args.vicap_root.resolve(), extra)
    where = subprocess.run(
        [sys.executable, "-c", "import vicap; print(vicap.__file__)"],
        cwd=args.vicap_root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    print(f"the training child imports {where.stdout.strip()}")
    run_vicap(
        ["features", recipe, *overrides, f"train.output_dir={work / 'runs' / 'features'}"],
        env,
        work / "features.log",
    )
    print(f"demo inputs and feature store ready in {time.perf_counter() - t:.0f} s (untimed)")

    results = []
    for r in range(args.rounds):
        for busy in (False, True):
            row = timed_train(
                work, f"{r}-{'busy' if busy else 'quiet'}", ["train", recipe, *overrides], env, busy
            )
            results.append(row)
            print(
                f"  {row['run']:10s} wall {row['wall_s']:6.1f} s  CPU {row['cpu_s']:6.1f} s  "
                f"loss {row['loss']}",
                flush=True,
            )

    print("\n| run | wall s | CPU s (user+sys) | final loss |\n|---|---|---|---|")
    for row in results:
        print(f"| {row['run']} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | {row['loss']} |")
    quiet = [x for x in results if x["run"].endswith("quiet")]
    busy = [x for x in results if x["run"].endswith("busy")]
    wall_ratio = max(b["wall_s"] / q["wall_s"] for q, b in zip(quiet, busy, strict=True))
    cpu_ratio = max(b["cpu_s"] / q["cpu_s"] for q, b in zip(quiet, busy, strict=True))
    print(
        f"\ncontended / quiet (worst round): wall {wall_ratio:.2f}x (target <= 2), "
        f"CPU seconds {cpu_ratio:.2f}x (target <= 1.3)"
    )


if __name__ == "__main__":
    main()
