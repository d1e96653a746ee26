"""Time from spawning llama-server to /health 200 for generated models (32k vocabulary vs 512).

Usage: python bench/load_time.py [--runs 5] [--server PATH]
The 512-token model is the in-run baseline: the ratio says what a real-sized vocabulary costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamactl.model.demo_model import write_demo_model  # noqa: E402
from llamactl.model.gguf import read_header  # noqa: E402
from llamactl.model.params import model_params  # noqa: E402
from llamactl.model.settings import ServerSettings, resolve  # noqa: E402
from llamactl.servers.buffers import free_port, measure  # noqa: E402
from llamactl.servers.command import build_command  # noqa: E402
from llamactl.servers.probe import find_server, probe  # noqa: E402
from tests.synth import ModelSpec, write_model  # noqa: E402


def ready_s(binary: Path, path: Path) -> float:
    params = model_params(read_header(path))
    port = free_port()
    cmd = build_command(binary, path, resolve(ServerSettings(ctx_size=2048), params, 0), probe(binary), port=port)
    return measure(list(cmd.argv), cmd.env, port).ready_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--server", default=None)
    args = parser.parse_args()
    binary = find_server(args.server)
    with tempfile.TemporaryDirectory() as tmp:
        small = write_model(Path(tmp) / "v512.gguf", ModelSpec())
        demo = write_demo_model(Path(tmp) / "demo-v32k.gguf")
        times: dict[str, list[float]] = {"512-token vocab (baseline)": [], "32000-token vocab (demo model)": []}
        for _ in range(args.runs):
            times["512-token vocab (baseline)"].append(ready_s(binary, small))
            times["32000-token vocab (demo model)"].append(ready_s(binary, demo))
    medians = {k: statistics.median(v) for k, v in times.items()}
    for name, value in medians.items():
        print(f"{name}: median {value * 1000:.0f} ms to /health 200 over {args.runs} runs")
    base, big = medians.values()
    print(f"ratio 32k/512: {big / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
