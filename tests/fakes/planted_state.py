"""Run as pid 1 of a fresh PID namespace (`unshare --pid --fork --mount-proc`): plant hostile state
entries that point at processes llamactl never started, run `llamactl evict`, report who survived.

Victims: this process (pid 1), sleepers that lead their own group and sleepers that share ours, each
planted with its real create time copied from the kernel (as from /proc/PID/stat), plus entries with a
null create time and broadcast-like pids. If any kill() reached them, they are missing from `alive`.
Prints one JSON object: {"alive": {...}, "evict": {rc, stdout, stderr}, "ps": ...}.
"""

import json
import os
import subprocess
import sys
import time

import psutil

state_dir = sys.argv[1]
only_plausible = sys.argv[2:] == ["plausible"]  # only entries of the right types: the kernel must decide
os.makedirs(state_dir, exist_ok=True)
sleepers = {
    "leader": subprocess.Popen(["sleep", "300"], start_new_session=True),
    "member": subprocess.Popen(["sleep", "300"]),
    # carries a tag, but for another state dir: still not ours
    "other-dir": subprocess.Popen(["sleep", "300"], start_new_session=True,
                                  env={**os.environ, "LLAMACTL_INSTANCE": "other-dir", "LLAMACTL_STATE_DIR": "/elsewhere"}),
}
time.sleep(0.2)


def entry(name, pid, create_time, port):
    return {"name": name, "model": "/m.gguf", "port": port, "pid": pid, "create_time": create_time, "argv": [],
            "env": {}, "gpu_ids": [], "estimated_bytes": {}, "started_at": time.time() - 3600,
            "last_used": time.time() - 3600, "started_by": "cli", "status": "ready", "activity": 0,
            "host": "127.0.0.1"}


planted = {
    "init": entry("init", 1, psutil.Process(1).create_time(), 9001),
    "null-ct": entry("null-ct", sleepers["leader"].pid, None, 9002),
    "minus-one": entry("minus-one", -1, 1.0, 9003),
    "zero": entry("zero", 0, 1.0, 9004),
    "self": entry("self", os.getpid(), psutil.Process().create_time(), 9005),
}
if only_plausible:
    planted = {"init": planted["init"]}
for i, (name, proc) in enumerate(sleepers.items()):
    planted[name] = entry(name, proc.pid, psutil.Process(proc.pid).create_time(), 9010 + i)
with open(os.path.join(state_dir, "state.json"), "w") as fh:
    json.dump({"version": 1, "instances": planted}, fh)

llamactl = [sys.executable, "-m", "llamactl", "--state-dir", state_dir]
evict = subprocess.run([*llamactl, "evict", "--all", "--grace", "1s"], capture_output=True, text=True, timeout=60)
ps = subprocess.run([*llamactl, "ps", "--json"], capture_output=True, text=True, timeout=60)
time.sleep(0.3)
alive = {name: proc.poll() is None for name, proc in sleepers.items()}
print(json.dumps({"alive": alive, "evict": {"rc": evict.returncode, "stdout": evict.stdout, "stderr": evict.stderr},
                  "ps": ps.stdout, "ps_rc": ps.returncode}))
for proc in sleepers.values():
    proc.kill()
