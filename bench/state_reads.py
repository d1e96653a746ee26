"""What a state read costs: the reconciling read (lock, liveness, adoption scan of every process's
environment, write back) vs the lock-free snapshot (`StateStore.snapshot`) that `plan` and shell
completion use, with N extra processes on the box and M recorded instances.

Usage: python bench/state_reads.py [--procs 100] [--instances 8] [--rounds 200]
Both reads run interleaved in the same process on the same state dir; the figure is the ratio of medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from llamactl.servers.procs import INSTANCE_ENV, STATE_DIR_ENV  # noqa: E402
from llamactl.servers.state import Instance, StateStore, Status  # noqa: E402
from tests.fakes.binary import server_named_sleep  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=100)
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = StateStore(Path(tmp) / "state")
        others = [subprocess.Popen(["sleep", "600"]) for _ in range(args.procs)]
        sleeper = str(server_named_sleep(Path(tmp)))  # llamactl only counts a llama.cpp server's executable
        ours = [subprocess.Popen([sleeper, "600"], start_new_session=True,
                                 env={**os.environ, INSTANCE_ENV: f"m{i}", STATE_DIR_ENV: str(store.dir.resolve())})
                for i in range(args.instances)]
        try:
            time.sleep(0.3)
            with store.edit() as instances:
                for i, proc in enumerate(ours):
                    instances[f"m{i}"] = Instance(name=f"m{i}", model="m.gguf", port=9000 + i, pid=proc.pid,
                                                  create_time=psutil.Process(proc.pid).create_time(), status=Status.READY)
            full, snap = [], []
            for _ in range(args.rounds):
                start = time.perf_counter()
                store.instances()
                full.append(time.perf_counter() - start)
                start = time.perf_counter()
                store.snapshot()
                snap.append(time.perf_counter() - start)
            assert len(store.snapshot()) == args.instances
            on_box = len(psutil.pids())
        finally:
            for proc in others + ours:
                proc.kill()
                proc.wait()
    f, s = statistics.median(full), statistics.median(snap)
    print(f"{on_box} processes on the box ({args.procs} extra), {args.instances} recorded instances")
    print(f"reconciling read (instances()): median {f * 1000:.2f} ms over {args.rounds} rounds")
    print(f"lock-free snapshot (snapshot()): median {s * 1000:.2f} ms over {args.rounds} rounds")
    print(f"snapshot is {f / s:.1f}x cheaper")
    return 0


if __name__ == "__main__":
    sys.exit(main())
