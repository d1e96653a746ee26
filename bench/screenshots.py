"""Screenshots for the docs: the proxy's status page (headless Chromium) and `llamactl top` (its screen,
rendered by rich to SVG), from a real proxy over fake llama-servers on two simulated GPUs.

Usage: python bench/screenshots.py [--out docs/img]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llamactl import views  # noqa: E402
from llamactl.cli.top import Screen, render  # noqa: E402
from llamactl.servers.buffers import free_port  # noqa: E402
from llamactl.servers.client import wait_healthy  # noqa: E402
from tests.fakes.binary import fake_server_binary  # noqa: E402
from tests.synth import ModelSpec, write_model  # noqa: E402

FAKE = ROOT / "tests" / "fakes" / "fake_llama_server.py"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        wrapper = fake_server_binary()  # an executable named llama-server (llamactl checks the name)
        small = write_model(tmp / "qwen-0.5b.gguf", ModelSpec(n_vocab=4096, n_embd=256, n_layer=4))
        big = write_model(tmp / "llama-8b.gguf", ModelSpec(n_vocab=8192, n_embd=512, n_layer=8))
        port = free_port()
        config = tmp / "config.toml"
        config.write_text(f'port = {port}\nport_start = {free_port()}\npoll_interval = "1s"\nidle_ttl = "30m"\n'
                          f'[defaults]\nargs = ["--fake-chunk-delay", "0.01"]\n'
                          f'[models.chat]\npath = "{big}"\naliases = ["gpt-4o-mini"]\nctx_size = 8192\n'
                          f'[models.small]\npath = "{small}"\nctx_size = 4096\n'
                          f'[models.embed]\npath = "{small}"\nembedding = true\nctx_size = 2048\n')
        env = {**os.environ, "LLAMACTL_STATE_DIR": str(tmp / "state"), "LLAMA_SERVER": str(wrapper)}
        proxy = subprocess.Popen([sys.executable, "-m", "llamactl", "--config", str(config), "proxy", "--gpus",
                                  "24GiB,24GiB"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            assert wait_healthy(url, 30, alive=lambda: proxy.poll() is None)
            for model in ("chat", "small", "chat", "small", "chat"):
                httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": [], "max_tokens": 16},
                           timeout=60)
            time.sleep(3)  # a few GPU history points
            shoot_page(url, args.out / "status-page.png")
            screen = Screen(snapshot=views.remote(url, None))
            from rich.console import Console

            console = Console(record=True, width=130, force_terminal=True, color_system="truecolor")
            console.print(render(screen, 130))
            console.save_svg(str(args.out / "top.svg"), title="llamactl top --url http://127.0.0.1:8080")
        finally:
            proxy.terminate()
            proxy.wait(timeout=30)
    print(f"wrote {args.out / 'status-page.png'} and {args.out / 'top.svg'}")


def shoot_page(url: str, path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,900", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(url + "/")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "ready" not in driver.find_element("id", "models").text:
            time.sleep(0.2)
        time.sleep(1.5)
        path.write_bytes(driver.get_screenshot_as_png())
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
