"""The llama-server process's memory beyond its logged buffers: RSS once ready minus the buffer sizes.

Usage: python bench/host_runtime.py [--server PATH]
Feeds HOST_RUNTIME_BASE_BYTES / HOST_RUNTIME_PER_TOKEN_BYTES in llamactl/model/memory.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamactl.model.demo_model import write_demo_model  # noqa: E402
from llamactl.model.gguf import read_header  # noqa: E402
from llamactl.model.params import model_params  # noqa: E402
from llamactl.model.settings import ServerSettings, resolve  # noqa: E402
from llamactl.servers.buffers import free_port, measure  # noqa: E402
from llamactl.servers.command import build_command  # noqa: E402
from llamactl.servers.probe import find_server, probe  # noqa: E402
from llamactl.units import MiB  # noqa: E402
from tests.synth import REALISTIC, ModelSpec, write_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=None)
    args = parser.parse_args()
    binary = find_server(args.server)
    qwen = replace(REALISTIC["qwen2.5-0.5b"], weight_type="Q8_0")
    writers: dict[str, Callable[[Path], Path]] = {
        "512-token vocab": lambda path: write_model(path, ModelSpec()),
        "32k vocab (demo)": write_demo_model,
        "152k vocab + merges (qwen2.5-0.5b Q8_0)": lambda path: write_model(path, qwen, sparse=True)}
    with tempfile.TemporaryDirectory() as tmp:
        for label, write in writers.items():
            path = write(Path(tmp) / "m.gguf")
            params = model_params(read_header(path))
            port = free_port()
            cmd = build_command(binary, path, resolve(ServerSettings(ctx_size=4096), params, 0), probe(binary),
                                port=port, verbose_buffers=True)
            got = measure(list(cmd.argv), cmd.env, port)
            buffers = sum(got.buffers.term(t) for t in ("weights", "kv", "compute", "output"))
            extra = (got.rss_bytes or 0) - buffers
            print(f"{label}: n_vocab {params.n_vocab}, RSS {got.rss_bytes / MiB:.1f} MiB, buffers {buffers / MiB:.1f} MiB, "
                  f"runtime {extra / MiB:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
