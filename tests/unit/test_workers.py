"""Remote devices, purely: what a worker exports, how the planning host merges and places them, the argv."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.config import WorkerConfig
from llamactl.config import load as load_config
from llamactl.errors import ConfigError, RemoteError, UsageError
from llamactl.gpu.inventory import Gpu, Inventory, from_json, parse_gpus_spec, to_json
from llamactl.gpu.remote import REMOTE_INDEX_BASE, with_workers
from llamactl.placement import Fit, Policy, plan
from llamactl.servers import worker
from llamactl.servers.command import check_extra_args
from llamactl.servers.launcher import cuda_devices, rpc_endpoints
from llamactl.servers.state import Instance
from llamactl.cli.worker import authorized
from tests.unit.test_placement import llama8b  # noqa: F401  (a fixture: Llama-3-8B Q4_0's params)

GiB = 2**30
NO_MARGIN = Policy(margin_bytes=0, gpu_overhead_bytes=0)


def _listing(*sizes_gib: float, host: str = "10.0.0.2", first_port: int = 50052) -> Inventory:
    return Inventory(tuple(Gpu(index=k, name="CPU", memory_total_bytes=int(s * GiB), memory_free_bytes=int(s * GiB),
                               memory_used_bytes=0, endpoint=f"{host}:{first_port + k}")
                           for k, s in enumerate(sizes_gib)), "worker")


def _workers(*names: str) -> tuple[WorkerConfig, ...]:
    return tuple(WorkerConfig(n, f"http://{n}.lan:50050", Path("/dev/null")) for n in names)


def _merged(local: str, **workers: Inventory) -> Inventory:
    return with_workers(parse_gpus_spec(local), _workers(*workers), lambda w: workers[w.name])


# --- the worker -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("gpus", "ids", "cpu", "expected"), [
    ("2x24GiB", None, None, [("GPU0", 50051), ("GPU1", 50052)]),  # every GPU by default
    ("2x24GiB", [1], 8 * GiB, [("GPU1", 50051), ("CPU", 50052)]),
    ("none", None, 8 * GiB, [("CPU", 50051)]),
])
def test_a_worker_exports_the_chosen_devices_on_consecutive_ports(gpus, ids, cpu, expected) -> None:
    got = worker.choose(parse_gpus_spec(gpus), ids, cpu, "127.0.0.1", 50051)
    assert [(e.device, e.port) for e in got] == expected
    assert len({e.name for e in got}) == len(got)


@pytest.mark.parametrize(("gpus", "ids", "cpu", "says"), [
    ("none", None, None, "--cpu-memory"),
    ("1x24GiB", [3], None, "no usable GPU 3"),
    ("none", None, 0, "positive"),
])
def test_a_worker_with_nothing_to_export_is_a_usage_error(gpus, ids, cpu, says) -> None:
    with pytest.raises(UsageError, match=says):
        worker.choose(parse_gpus_spec(gpus), ids, cpu, "127.0.0.1", 50051)


def test_an_rpc_server_is_pinned_to_its_gpu_and_binds_the_given_address_only() -> None:
    gpu = worker.Export("rpc-a", 50051, gpu_index=1, gpu_uuid="GPU-abc")
    argv, env = worker.command(Path("/bin/ggml-rpc-server"), "10.0.0.2", gpu, threads=4)
    assert argv[1:5] == ["--host", "10.0.0.2", "--port", "50051"] and env == {"CUDA_VISIBLE_DEVICES": "GPU-abc"}
    argv, env = worker.command(Path("/bin/ggml-rpc-server"), "10.0.0.2", worker.Export("rpc-b", 50052,
                                                                                       cpu_memory_bytes=GiB), threads=4)
    assert argv[-4:] == ["--device", "CPU", "--threads", "4"] and env == {"CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.parametrize(("header", "ok"), [
    ("Bearer s3cret", True), ("Bearer s3cre", False), ("Bearer s3cret2", False), ("s3cret", False),
    ("Basic s3cret", False), (None, False), ("", False),
])
def test_only_the_workers_key_is_authorized(header, ok) -> None:
    assert authorized(header, "s3cret") is ok


def test_a_workers_rpc_server_entry_round_trips_and_an_unknown_kind_is_refused() -> None:
    inst = Instance(name="rpc-127.0.0.1-50051", model="rpc:CPU", port=50051, pid=1234, create_time=1.0, kind="rpc")
    assert Instance.from_json(inst.name, inst.to_json()) == inst and not inst.serves_http
    with pytest.raises(ValueError, match="kind"):
        Instance.from_json(inst.name, {**inst.to_json(), "kind": "shell"})


# --- the inventory ---------------------------------------------------------------------------------------

def test_remote_devices_follow_the_local_ones_named_as_llama_cpp_names_them() -> None:
    inv = _merged("1x24GiB", a=_listing(16), b=_listing(8, 8, host="0.0.0.0"))
    assert [(g.index, g.name, g.worker) for g in inv.gpus] == [
        (0, "simulated 24GiB", None), (REMOTE_INDEX_BASE, "RPC0[10.0.0.2:50052]", "a"),
        (REMOTE_INDEX_BASE + 64, "RPC0[b.lan:50052]", "b"), (REMOTE_INDEX_BASE + 65, "RPC0[b.lan:50053]", "b")]
    # the schema carries them (a planning host can save and replay its merged inventory)
    assert from_json(to_json(inv), "x").gpus[1].endpoint == "10.0.0.2:50052"


def test_a_worker_that_fails_is_left_out_with_a_warning_naming_it(caplog) -> None:
    def fetch(w: WorkerConfig) -> Inventory:
        if w.name == "down":
            raise RemoteError("answered 401 (wrong key)")
        return _listing(16)

    inv = with_workers(parse_gpus_spec("none"), _workers("down", "up"), fetch)
    assert [g.worker for g in inv.gpus] == ["up"] and inv.gpus[0].index == REMOTE_INDEX_BASE + 64
    assert "worker down" in caplog.text and "401" in caplog.text


@pytest.mark.parametrize("endpoint", ["10.0.0.2", "10.0.0.2:0", "a b:1", "host:99999", 7])
def test_an_inventory_entry_with_a_bad_endpoint_is_refused(endpoint) -> None:
    entry = {"memory_total_bytes": GiB, "endpoint": endpoint}
    with pytest.raises(UsageError, match="endpoint"):
        from_json([entry], "worker a")


# --- placement and argv ---------------------------------------------------------------------------------

def test_local_gpus_are_preferred_to_a_workers(llama8b) -> None:  # noqa: F811
    inv = _merged("2x4GiB", a=_listing(80))  # the two local GPUs together hold it: no network hop
    got = plan(llama8b, _settings(), inv.usable, NO_MARGIN)
    assert got.fit is Fit.GPU and all(i < REMOTE_INDEX_BASE for i in got.gpu_ids)


def test_a_model_too_big_for_the_host_spans_the_fewest_workers_remote_devices_first(llama8b) -> None:  # noqa: F811
    need = plan(llama8b, _settings(), parse_gpus_spec("1x80GiB").usable, NO_MARGIN).estimate
    assert need is not None
    share = need.device("GPU0").total_bytes * 0.45 / GiB
    # the local GPU and worker a's two devices hold it; worker b (with more room on one device) is not needed
    inv = _merged(f"{share * 1024:.0f}MiB", b=_listing(share * 1.2), a=_listing(share, share))
    got = plan(llama8b, _settings(), inv.usable, NO_MARGIN)
    assert got.fit is Fit.GPU, got.reasons
    workers = {g.index: g.worker for g in inv.gpus}
    assert {workers[i] for i in got.gpu_ids} == {None, "a"}
    # llama.cpp puts RPC devices first: the plan's order is the -ts order
    assert [workers[i] is not None for i in got.gpu_ids] == sorted((workers[i] is not None for i in got.gpu_ids),
                                                                   reverse=True)
    assert rpc_endpoints(got.gpu_ids, inv) == tuple(g.endpoint for i in got.gpu_ids for g in inv.gpus
                                                   if g.index == i and g.remote)
    assert cuda_devices(got.gpu_ids, inv) == ("0",)
    assert any("other host(s) (a)" in r for r in got.reasons)


def test_a_hand_written_rpc_is_passed_unless_the_plan_uses_workers(llama8b) -> None:  # noqa: F811
    """`-- --rpc HOST:PORT` (devices llamactl does not place, as before workers) goes through; beside a plan's
    own --rpc it is refused, naming both."""
    from llamactl.model.settings import ServerSettings, resolve
    from llamactl.servers.command import ASSUMED_FLAGS, build_command
    from llamactl.servers.probe import ServerCaps

    check_extra_args(["--rpc", "10.0.0.2:50052"])
    caps = ServerCaps("llama-server", "assumed", None, ASSUMED_FLAGS)
    with pytest.raises(UsageError, match="workers"):
        build_command("llama-server", "m.gguf", resolve(ServerSettings(), llama8b, 1), caps,
                      extra=["--rpc", "10.0.0.2:50052"], rpc=["10.0.0.3:50052"])


# --- the config -----------------------------------------------------------------------------------------

def test_workers_are_read_in_order_with_key_files_beside_the_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[workers.b]\nurl = "http://10.0.0.3:50050"\napi_key_file = "b.key"\n'
                   '[workers.a]\nurl = "http://[fd00::2]:50050/"\napi_key_file = "/etc/a.key"\n')
    got = load_config(cfg).workers
    assert got == (WorkerConfig("b", "http://10.0.0.3:50050", tmp_path / "b.key"),
                   WorkerConfig("a", "http://[fd00::2]:50050", Path("/etc/a.key")))


@pytest.mark.parametrize(("table", "says"), [
    ('url = "10.0.0.3:50050"\napi_key_file = "k"', "http://HOST:PORT"),
    ('url = "http://10.0.0.3:50050/inventory"\napi_key_file = "k"', "http://HOST:PORT"),
    ('url = "http://10.0.0.3:50050"', "missing key api_key_file"),
    ('url = "http://10.0.0.3:50050"\napi_key_file = "k"\napi_key = "x"', "api_key"),
])
def test_a_bad_worker_table_is_one_line_naming_the_key(tmp_path: Path, table: str, says: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[workers.w]\n{table}\n")
    with pytest.raises(ConfigError, match=says):
        load_config(cfg)


def _settings():  # noqa: ANN202
    from llamactl.model.settings import ServerSettings

    return ServerSettings(ctx_size=4096)
