"""The config file: TOML and the seed's JSON, defaults, models_dir, and one clear error per bad key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamactl.config import ConfigError, load


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_full_example(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    for name in ("a.gguf", "big-00001-of-00002.gguf", "big-00002-of-00002.gguf"):
        (tmp_path / "models" / name).write_bytes(b"")
    cfg = load(write(tmp_path, '''
port = 9000
idle_ttl = "1h30m"
models_dir = "models"
api_keys = ["k"]
[defaults]
ctx_size = 8192
args = ["--jinja"]
[models.chat]
path = "models/a.gguf"
aliases = ["gpt-4o-mini"]
ttl = "2m"
cache_type_k = "q8_0"
flash_attn = true
gpus = [0, 1]
n_cpu_moe = 12
reranking = true
override_tensor = ['blk\\.0\\.ffn_up=CPU,blk\\.1\\.ffn_up=CUDA1']
lora = ["adapters/style.gguf", "/abs/other.gguf"]
'''))
    assert (cfg.port, cfg.idle_ttl_s, cfg.api_keys) == (9000, 5400.0, ("k",))
    assert sorted(cfg.models) == ["a", "big", "chat"]  # split files count once
    chat = cfg.models["chat"]
    assert chat.path == tmp_path / "models" / "a.gguf" and chat.ttl_s == 120.0 and chat.placement.allowed_gpus == (0, 1)
    assert (chat.settings.ctx_size, chat.settings.cache_type_k, chat.settings.flash_attn) == (8192, "q8_0", "on")
    assert chat.args == ("--jinja",) and cfg.models["big"].settings.ctx_size == 8192
    assert chat.settings.lora == (str(tmp_path / "adapters" / "style.gguf"), "/abs/other.gguf")  # relative to the file
    assert chat.settings.tensor_overrides == ((r"blk\.0\.ffn_up", "CPU"), (r"blk\.1\.ffn_up", "CUDA1"))
    assert chat.settings.n_cpu_moe == 12 and chat.settings.reranking and cfg.models["big"].settings.n_cpu_moe is None  # unset: plan decides
    assert cfg.lookup("gpt-4o-mini") is chat and cfg.lookup("models/a.gguf") is None


def test_keep_cache_and_its_bound_per_model_and_in_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, '[defaults]\nkeep_cache = true\ncache_max = "512MiB"\n'
                               '[models.a]\npath = "a.gguf"\n[models.b]\npath = "b.gguf"\nkeep_cache = false\n'
                               '[models.c]\npath = "c.gguf"\ncache_max = "1.5GiB"\n'))
    got = {n: (m.residency.keep_cache, m.residency.cache_max_bytes) for n, m in cfg.models.items()}
    assert got == {"a": (True, 512 << 20), "b": (False, 512 << 20), "c": (True, 3 << 29)}
    assert load(write(tmp_path, '[models.a]\npath = "a.gguf"\n')).models["a"].residency.cache_max_bytes == 4 << 30


@pytest.mark.parametrize(("text", "message"), [
    ("port = 9000\n[defaults]\nctx_sise = 4\n", "config.toml:3: defaults.ctx_sise: unknown key"),
    ("port = \"x\"\n", "config.toml:1: port: expected an integer"),
    ("port = 70000\n", "port: out of range"),
    ("idle_ttl = \"soon\"\n", "idle_ttl"),
    ("[models.m]\nctx_size = 4\n", "models.m: missing key path"),
    ("[models.m]\npath = \"m.gguf\"\ncache_type_v = \"q3\"\n", "config.toml:3: models.m.cache_type_v: unknown cache type"),
    ("[models.a]\npath = \"a.gguf\"\naliases = [\"x\"]\n[models.b]\npath = \"b.gguf\"\naliases = [\"x\"]\n", "already names"),
    ("gpu_mem_threshold = 2\n", "gpu_mem_threshold"),
    ("[models.m]\npath = \"m.gguf\"\nlora = \"a.gguf\"\n", "models.m.lora"),
    ("[defaults]\nlora = [\"a.gguf\"]\n", "defaults.lora: unknown key"),
    ("[defaults]\noverride_tensor = [\"ffn=Metal\"]\n", "defaults.override_tensor: 'ffn=Metal': buffer 'Metal' is not modelled"),
    ("[models.m]\npath = \"m.gguf\"\nn_cpu_moe = -2\n", "config.toml:3: models.m.n_cpu_moe: expected a number >= 0 or 'all'"),
    ("this is = not toml [", "invalid TOML"),
    ("[models.\"a/b\"]\npath = \"m.gguf\"\n", "models.a/b: a model name is an instance name"),
    ("[defaults]\nargs = [\"--port\", \"9\"]\n", "defaults.args: --port is set by llamactl; use the config key port_start"),
    ("[defaults]\nargs = [\"-c\", \"9\"]\n", "defaults.args: -c is set by llamactl; use the config key ctx_size"),
    ("[defaults]\nargs = [\"--no-mmap\"]\n", "use the config key no_mmap"),
    ("[defaults]\nargs = [\"--mmproj-url\", \"u\"]\n", "--mmproj-url (a vision projector from a URL"),
    ("[defaults]\nargs = [\"-dev\", \"CUDA0\"]\n", "defaults.args: extra argument -dev (device list) is refused: llamactl chooses the GPUs and hides the others from llama-server; gpus = [...] (n_gpu_layers = 0 for none) instead"),
    ("[defaults]\ntensor_split = [1, \"x\"]\n", "defaults.tensor_split: expected a list of shares"),
    ("[defaults]\ntensor_split = [0, 0]\n", "defaults.tensor_split"),
    ("[defaults]\nstrategy = \"random\"\n", "defaults.strategy: expected spread or pack"),
    ("[defaults]\nmargin = \"lots\"\n", "defaults.margin"),
    ("gpu_util_threshold = 101\n", "gpu_util_threshold: must be in 0..100"),
    ("gpu_overhead = -1\n", "gpu_overhead: out of range"),
    # every number bounded and finite (a negative poll spins a CPU, nan stops the poller, 0 lifts the cap)
    ("poll_interval = -1\n", "poll_interval"),
    ("poll_interval = nan\n", "poll_interval"),
    ("poll_interval = \"0.001s\"\n", "poll_interval: must be at least 0.1 s"),
    ("load_timeout = inf\n", "load_timeout"),
    ("load_timeout = \"nan\"\n", "load_timeout"),
    ("idle_ttl = -5\n", "idle_ttl"),
    ("[models.m]\npath = \"m.gguf\"\nttl = nan\n", "models.m.ttl"),
    ("max_body = 0\n", "max_body: must be between 1KiB and 16GiB"),
    ("max_body = \"1TiB\"\n", "max_body: must be between 1KiB and 16GiB"),
    ("max_queue = 10000000\n", "max_queue: out of range"),
    ("max_instances = 100000\n", "max_instances: out of range"),
    ("api_keys = [\"  \"]\n", "api_keys: expected a list of non-empty keys"),
    ("api_keys = [\"a b\"]\n", "api_keys: expected a list of non-empty keys"),
    ("[defaults]\nctx_size = -1\n", "defaults.ctx_size"),
    ("[defaults]\nctx_size = 100000000000\n", "defaults.ctx_size"),
    ("[defaults]\nbatch_size = 100000000000\n", "defaults.batch_size"),
    ("[defaults]\nmax_gpus = 0\n", "defaults.max_gpus"),
    ("models_dir = \"nowhere\"\n", "is not a directory"),
    ("[models.v]\nof = \"nope\"\n", "models.v.of: 'nope' is not a configured model"),
    ("[models.a]\npath = \"a.gguf\"\n[models.v]\nof = \"a\"\npath = \"b.gguf\"\n", "models.v.path: unknown key"),
    ("[models.a]\npath = \"a.gguf\"\n[models.a.request]\nforce = { model = \"x\" }\n",
     "models.a.request.force: may not set the body's model"),
    ("[models.a]\npath = \"a.gguf\"\n[models.a.request]\ndefault = { top_k = 1 }\n",
     "models.a.request.default: unknown key; did you mean `defaults`?"),
    ("[defaults]\ncache_max = 4096\n", "defaults.cache_max: expected a size like \"4GiB\""),
    ("[models.m]\npath = \"m.gguf\"\ncache_max = \"4 parsecs\"\n", "config.toml:3: models.m.cache_max: invalid size"),
    ("[models.m]\npath = \"m.gguf\"\nkeep_cache = \"yes\"\n", "models.m.keep_cache: expected true or false"),
    ("[defaults]\nargs = [\"--slot-save-path\", \"/tmp\"]\n", "--slot-save-path is set by llamactl; use the config key keep_cache"),
    ('[models.m]\nurl = "http://h:1"\nctx_size = 4096\n', "models.m.ctx_size: a remote model (url) takes no llama-server"),
    ('[models.m]\nurl = "http://h:1"\npath = "m.gguf"\n', "models.m.url: give path (a model run here) or url"),
    ('[models.m]\nurl = "ftp://h"\n', "models.m.url: expected http://HOST:PORT"),
    ('[models.m]\nurl = "http://h:1"\napi_key = "a"\napi_key_file = "k"\n', "models.m.api_key_file: give api_key or"),
    ('[models.m]\nurl = "http://h:1"\napi_key_file = "missing"\n', "models.m.api_key_file: cannot read"),
    ('[upstreams.b]\napi_key = "k"\n', "upstreams.b: expected a table with url"),
    ('[upstreams.b]\nurl = "http://h:1"\nctx_size = 1\n', "upstreams.b.ctx_size: unknown key"),
    ('[models.a]\npath = "a.gguf"\naliases = ["m"]\n[models.m]\nurl = "http://h:1"\n', "'m' already names model 'a'"),
])
def test_bad_keys_name_the_key_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("data", [[1, 2], {"models": [1]}, {"server_pool": 5}, {"models": {"m": 5}},
                                  {"port": "x"}, {"cache_type_bits": "8"}, {"models": {"m": {"path": 5}}}])
def test_seed_json_of_the_wrong_shape_is_a_usage_error(tmp_path: Path, data) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, json.dumps(data), "config.json"))
    assert "\n" not in str(info.value)


def test_seed_json(tmp_path: Path) -> None:
    seed = {"backend": "llama.cpp", "server_pool": {"size": 4, "port_start": 8080},
            "models": {"llama-7b": {"path": "models/llama-7b.gguf", "max_gpus": 2}},
            "gpu_util_threshold": 50, "gpu_mem_threshold": 0.5, "ctx_size": 2048, "cache_type_bits": 8, "gpu_layers": -1}
    cfg = load(write(tmp_path, json.dumps(seed), "config.json"))
    model = cfg.models["llama-7b"]
    assert (cfg.max_instances, cfg.port_start, model.placement.max_gpus) == (4, 8080, 2)
    assert (model.settings.ctx_size, model.settings.cache_type_k, model.settings.cache_type_v) == (2048, "q8_0", "q8_0")
    assert model.settings.flash_attn == "on" and model.settings.n_gpu_layers is None


def test_missing_files(tmp_path: Path) -> None:
    assert load(tmp_path / "none.toml").models == {}
    with pytest.raises(ConfigError, match="no such config file"):
        load(tmp_path / "none.toml", required=True)


def test_every_estimate_setting_is_a_config_key(tmp_path: Path) -> None:
    """`estimate`'s flags and the config's keys say the same things (issue: swa_full, no_mmap, ... refused)."""
    cfg = load(write(tmp_path, '''
gpu_overhead = "300MiB"
host_memory = "64GiB"
gpu_util_threshold = 30
[defaults]
swa_full = true
no_mmap = true
kv_offload = false
repack = false
tensor_split = [3, 1]
strategy = "pack"
margin = "1GiB"
no_partial = true
[models.m]
path = "m.gguf"
max_gpus = 1
kv_offload = true
'''))
    s, p = cfg.models["m"].settings, cfg.models["m"].placement
    assert (s.swa_full, s.mmap, s.kv_offload, s.repack, s.tensor_split) == (True, False, True, False, (3.0, 1.0))
    assert (p.strategy.value, p.margin_bytes, p.allow_partial, p.max_gpus) == ("pack", 2**30, False, 1)
    assert (p.gpu_overhead_bytes, p.host_memory_bytes, p.util_threshold) == (300 * 2**20, 64 * 2**30, 30)
    assert cfg.defaults.kv_offload is False and cfg.placement.max_gpus is None  # [defaults] vs the model's own


def test_a_draft_model_is_configured_by_keys_not_args(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"")
    cfg = load(write(tmp_path, '[models.a]\npath = "m.gguf"\nmodel_draft = "d.gguf"\nn_gpu_layers_draft = 2\n'
                               'cache_type_k_draft = "Q8_0"\ncache_type_v_draft = "q8_0"\n'))
    s = cfg.models["a"].settings
    assert (s.draft_model, s.draft_n_gpu_layers, s.draft_cache_type_k, s.draft_cache_type_v) == (
        str(tmp_path / "d.gguf"), 2, "q8_0", "q8_0")
    with pytest.raises(ConfigError, match="-md is set by llamactl; use the config key model_draft"):
        load(write(tmp_path, '[models.a]\npath = "m.gguf"\nargs = ["-md", "d.gguf"]\n'))
    with pytest.raises(ConfigError, match="n_gpu_layers_draft: expected a number"):
        load(write(tmp_path, '[models.a]\npath = "m.gguf"\nn_gpu_layers_draft = "some"\n'))
    with pytest.raises(ConfigError, match="--mmproj is set by llamactl; use the config key mmproj"):
        load(write(tmp_path, '[models.a]\npath = "m.gguf"\nargs = ["--mmproj", "p.gguf"]\n'))
    cfg = load(write(tmp_path, '[models.a]\npath = "m.gguf"\nmmproj = "p.gguf"\nno_mmproj_offload = true\n'))
    assert (cfg.models["a"].settings.mmproj, cfg.models["a"].settings.mmproj_offload) == (str(tmp_path / "p.gguf"), False)


def test_a_models_env_is_read_sorted(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, '[models.m]\npath = "m.gguf"\nenv = {HF_HOME = "/data/hf", GGML_SCHED_MAX_COPIES = "1"}\n'))
    assert cfg.models["m"].env == (("GGML_SCHED_MAX_COPIES", "1"), ("HF_HOME", "/data/hf"))


@pytest.mark.parametrize("env, message", [
    ('{lower = "x"}', "'lower' is not an environment variable name"),
    ('{"1X" = "x"}', "'1X' is not an environment variable name"),
    ('{LLAMA_API_KEY = "x"}', "LLAMA_API_KEY is set by llamactl"),
    ('{CUDA_VISIBLE_DEVICES = "0"}', "CUDA_VISIBLE_DEVICES is set by llamactl"),
    ('{LLAMACTL_INSTANCE = "x"}', "LLAMACTL_INSTANCE is set by llamactl"),
    ('{LLAMA_ARG_CTX_SIZE = "9"}', "LLAMA_ARG_CTX_SIZE is set by llamactl"),
    ('{X = 1}', "models.m.env.X: expected a printable string"),
    ('{X = "a\\nb"}', "models.m.env.X: expected a printable string"),
    ('"X=1"', "models.m.env: expected dict"),
])
def test_a_bad_env_names_the_key(tmp_path: Path, env: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, f'[models.m]\npath = "m.gguf"\nenv = {env}\n'))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_worked_example_in_docs_proxy_md_is_a_valid_config(tmp_path: Path) -> None:
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "proxy.md").read_text()
    block = re.search(r"<!-- example: five models -->\n```toml\n(.*?)```", text, re.S)
    assert block is not None, "docs/proxy.md lost its worked example"
    cfg = load(write(tmp_path, block.group(1)))
    assert sorted(cfg.models) == ["big", "chat", "code", "embed", "vision"] and list(cfg.variants) == ["chat-precise"]
    assert cfg.models["chat"].residency.pin and not cfg.models["code"].residency.spill
    assert cfg.route("chat-precise")[0].name == "chat"


def test_remote_models_and_upstreams(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "big.gguf").write_bytes(b"")
    (tmp_path / "back.key").write_text("file-key\n")
    cfg = load(write(tmp_path, '''
models_dir = "models"
[models.big]
url = "http://gpu-box.lan:8080/"
api_key = "inline-key"
[upstreams.box2]
url = "http://10.0.0.2:8080"
api_key_file = "back.key"
'''))
    assert "big" not in cfg.models  # the url model replaces the file of its name: nothing of it runs here
    assert cfg.remotes["big"].url == "http://gpu-box.lan:8080" and cfg.remotes["big"].api_key == "inline-key"
    (box2,) = cfg.upstreams
    assert (box2.name, box2.url, box2.api_key) == ("box2", "http://10.0.0.2:8080", "file-key")
    assert "key" not in repr(cfg.remotes) + repr(cfg.upstreams)  # keys are never shown


def test_a_bad_remote_key_is_named_never_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, '[models.m]\nurl = "http://h:1"\napi_key = "two words"\n'))
    assert "models.m.api_key: expected a non-empty key" in str(caught.value) and "two" not in str(caught.value)
