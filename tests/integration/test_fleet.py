"""The fleet plan (`llamactl plan` with no model) and the proxy's start-up that follows it, with fake
llama-servers on simulated GPUs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_proxy import Proxy, wait_for

# two GPUs that each hold one model beside the 512 MiB margin: a third would run on the CPU
GPUS = "2x1GiB"


def fleet_config(tmp: Path) -> str:
    model = tmp / "tiny.gguf"  # written by Proxy before it starts
    return "".join(f'[models.{name}]\npath = "{model}"\n{keys}\n' for name, keys in (
        ("chat", "preload = true"), ("spare", "priority = 9"), ("code", "preload = true\npriority = 3"),
        ("batch", "preload = true")))


def plan_json(p: Proxy) -> tuple[int, dict]:
    out = subprocess.run([sys.executable, "-m", "llamactl", "--config", str(p.config), "plan", "--json"], env=p.env,
                         capture_output=True, text=True, timeout=60)
    return out.returncode, json.loads(out.stdout)


@pytest.fixture
def fleet(tmp_path: Path):
    p = Proxy(tmp_path, {}, gpus=GPUS, defaults="\n" + fleet_config(tmp_path))
    yield p
    p.stop()


def test_the_proxy_preloads_what_the_fleet_plan_shows(fleet: Proxy) -> None:
    code, plan = plan_json(fleet)
    by_name = {m["name"]: m for m in plan["models"]}
    # preloaded first, then by priority: code (preload, priority 3), chat and batch (preload), then spare
    assert [m["name"] for m in plan["models"]] == ["code", "chat", "batch", "spare"]
    assert plan["preload_order"] == ["code", "chat"] and not by_name["batch"]["resident"]
    assert code == 4 and plan["ok"] is False  # batch is a preload model that does not fit beside the others
    assert "no room beside code, chat" in by_name["batch"]["reasons"][0]
    # the proxy starts exactly those, on the plan's GPUs, in its order, and nothing else
    assert wait_for(lambda: {i["name"] for i in fleet.instances() if i["state"] == "ready"} == {"code", "chat"}, 30), \
        fleet.logs()
    ready = {i["name"]: i for i in fleet.instances()}
    assert {n: ready[n]["gpu_ids"] for n in ("code", "chat")} == {n: by_name[n]["gpu_ids"] for n in ("code", "chat")}
    assert ready["batch"]["state"] == ready["spare"]["state"] == "stopped"
    launches = [line.split(": ready on port")[0].split()[-1] for line in fleet.logs().splitlines()
                if ": ready on port" in line]
    assert launches == ["code", "chat"], fleet.logs()


def test_spill_false_is_refused_with_the_reasons_not_run_on_the_cpu(tmp_path: Path) -> None:
    model = tmp_path / "tiny.gguf"
    p = Proxy(tmp_path, {}, gpus="none", defaults=f'\n[models.gpuonly]\npath = "{model}"\nspill = false\n'
                                                  f'[models.any]\npath = "{model}"\n')
    try:
        refused = p.post("gpuonly")
        assert refused.status_code == 503, refused.text
        assert "spill = false" in refused.json()["error"]["message"] and "CPU" in refused.json()["error"]["message"]
        assert p.post("any").status_code == 200  # spill allowed: on the CPU it runs
        assert {i["name"]: i["state"] for i in p.instances()}["gpuonly"] == "stopped"
    finally:
        p.stop()


def test_a_pinned_model_outlives_its_ttl_and_is_never_the_victim(tmp_path: Path) -> None:
    model = tmp_path / "tiny.gguf"
    p = Proxy(tmp_path, {}, 'max_instances = 2\nidle_ttl = "1s"\nload_timeout = "2s"',
              defaults=f'\n[models.keep]\npath = "{model}"\npin = true\n[models.other]\npath = "{model}"\n'
                       f'[models.third]\npath = "{model}"\n')
    try:
        assert p.post("keep").status_code == 200 and p.post("other").status_code == 200
        states = lambda: {i["name"]: i["state"] for i in p.instances()}  # noqa: E731
        assert wait_for(lambda: states()["other"] == "stopped", 20), p.logs()  # the TTL stopped the unpinned one
        assert states()["keep"] == "ready"
        assert p.post("other").status_code == 200
        # max_instances reached: the idle unpinned one makes room, never the pinned one (used longer ago)
        assert p.post("third").status_code == 200
        assert states()["keep"] == "ready" and states()["other"] == "stopped"
    finally:
        p.stop()


def test_requests_beyond_the_slots_wait_in_the_proxy_never_in_llama_server(tmp_path: Path) -> None:
    """Eight concurrent streams for a 2-slot model: never more than 2 reach the instance, all are answered;
    with a short queue_timeout and max_queue, the excess gets 429 with Retry-After."""
    import concurrent.futures

    import httpx

    model = tmp_path / "tiny.gguf"
    p = Proxy(tmp_path, {}, defaults=f'parallel = 2\n[models.two]\npath = "{model}"\n'
                                     f'args = ["--fake-chunk-delay", "0.03"]\n'
                                     f'[models.tight]\npath = "{model}"\nqueue_timeout = "0.2s"\nmax_queue = 2\n'
                                     f'args = ["--fake-chunk-delay", "0.2"]\n')
    try:
        def stream(name: str) -> httpx.Response:
            return p.post(name, stream=True, max_tokens=8, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(stream, ["two"] * 8))
        assert [r.status_code for r in replies] == [200] * 8
        url = {i["name"]: i["url"] for i in p.instances()}["two"]
        busiest = [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith("fake:max_busy")]
        assert busiest == ["fake:max_busy 2"]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(stream, ["tight"] * 6))
        codes = sorted(r.status_code for r in replies)
        assert codes.count(200) >= 2 and 429 in codes, codes
        assert all(int(r.headers["Retry-After"]) >= 1 for r in replies if r.status_code == 429)
        # what operators watch: refusals by reason, the queue wait and the load time per model
        refused = sum(p.metric("llamactl_refusals_total", model="tight", reason=why) for why in ("queue_full", "queue_timeout"))
        assert refused == codes.count(429)
        assert p.metric("llamactl_load_seconds_count", model="two") == 1
        assert p.metric("llamactl_queue_wait_seconds_count", model="two") == 8
    finally:
        p.stop()


def test_request_rules_and_variants_share_one_instance(tmp_path: Path) -> None:
    """[models.NAME.request] defaults, force and strip reach llama-server's body; a variant (`of`) runs on its
    model's instance with its own rules, without a second load."""
    import httpx

    model = tmp_path / "tiny.gguf"
    p = Proxy(tmp_path, {}, defaults=f'\n[models.base]\npath = "{model}"\n'
                                     '[models.base.request]\ndefaults = { temperature = 0.2, top_p = 0.9 }\n'
                                     'force = { n_probs = 0 }\nstrip = ["seed"]\n'
                                     '[models.hot]\nof = "base"\n[models.hot.request]\nforce = { temperature = 1.5 }\n')
    try:
        echo = p.post("base", temperature=0.7, seed=5).json()["echo"]
        assert echo["temperature"] == 0.7 and echo["top_p"] == 0.9 and echo["n_probs"] == 0 and "seed" not in echo
        echo = p.post("hot", temperature=0.1, seed=5).json()["echo"]
        assert echo["temperature"] == 1.5 and "top_p" not in echo and echo["seed"] == 5  # the variant's rules only
        listed = {m["id"]: m for m in httpx.get(f"{p.url}/v1/models").json()["data"]}
        assert listed["hot"]["of"] == "base" and listed["hot"]["status"] == "ready"
        assert p.metric("llamactl_launches_total", model="base", result="ok") == 1 and len(p.tagged()) == 1
    finally:
        p.stop()


def test_a_streaming_client_hears_from_a_loading_model(tmp_path: Path) -> None:
    """A stream whose model takes more than a second to load gets its event stream then, with SSE comment lines
    (`: loading NAME N s`) until the answer's events; a start that fails later ends it with an error event
    (counted as the failure's status); one that fails at once is the ordinary error answer."""
    import httpx

    model = tmp_path / "tiny.gguf"
    p = Proxy(tmp_path, {}, 'load_timeout = "4s"',
              defaults=f'\n[models.slow]\npath = "{model}"\nargs = ["--fake-ready-after", "2"]\n'
                       f'[models.never]\npath = "{model}"\nargs = ["--fake-ready-after", "60"]\n'
                       f'[models.gpuonly]\npath = "{model}"\nspill = false\n')

    def stream(name: str) -> tuple[int, list[str]]:
        with httpx.stream("POST", f"{p.url}/v1/chat/completions", timeout=30,
                          json={"model": name, "messages": [], "stream": True, "max_tokens": 3}) as reply:
            return reply.status_code, [line for line in reply.iter_lines() if line]

    try:
        status, lines = stream("slow")
        assert status == 200 and lines[0] == ": loading slow 1 s", lines
        assert lines[-1] == "data: [DONE]" and sum(line.startswith("data: {") for line in lines) == 4
        # a request that does not stream gets its answer once ready, as ever (no comment lines)
        assert p.post("slow", max_tokens=2).json()["choices"][0]["message"]["content"] == "fake fake "
        status, lines = stream("never")  # not ready within load_timeout: the stream's last event says so
        assert status == 200 and lines[0].startswith(": loading never") and '"code": "load_timeout"' in lines[-1], lines
        assert p.metric("llamactl_requests_total", model="never", status="504") == 1
        status, lines = stream("gpuonly")  # refused at once: the ordinary 503
        assert status == 503 and "spill = false" in lines[0], lines
    finally:
        p.stop()


def test_ps_shows_the_ttl_a_running_proxy_keeps_for_its_instances(tmp_path: Path) -> None:
    model = tmp_path / "tiny.gguf"
    p = Proxy(tmp_path, {}, 'idle_ttl = "10m"', defaults=f'\n[models.kept]\npath = "{model}"\n')
    try:
        assert p.post("kept").status_code == 200

        def listed() -> list[dict]:
            out = subprocess.run([sys.executable, "-m", "llamactl", "ps", "--json"], env=p.env, capture_output=True,
                                 text=True, timeout=60)
            return json.loads(out.stdout)

        assert wait_for(lambda: listed()[0]["ttl_s"] == 600, 15), listed()
        assert 0 < listed()[0]["ttl_left_s"] <= 600
        text = subprocess.run([sys.executable, "-m", "llamactl", "ps"], env=p.env, capture_output=True, text=True,
                              timeout=60).stdout
        header, row = text.splitlines()[0], text.splitlines()[2]
        assert header.split()[-1] == "TTL" and row.split()[-1].startswith("9m"), text
    finally:
        p.stop()
