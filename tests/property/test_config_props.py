"""Property tests of the config loader, `llamactl.config.load`.

Contract: whatever the file holds (random TOML or JSON documents over the real keys with random-typed values,
random text, random bytes), `load` returns a Config or raises ConfigError (a UsageError, exit code 2) with a
one-line message naming the file; never another exception.
"""

from __future__ import annotations

import atexit
import json
import math
import shutil
import tempfile
import tomllib
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from llamactl.config import _GLOBAL_KEYS, _MODEL_KEYS, _SETTING_KEYS, Config, ConfigError, load
from llamactl.errors import LlamactlError
from tests.property.contract import (CONFIG_DURATION_OVERFLOW, CONFIG_INT_DIGITS, CONFIG_JSON_NO_PATH, CONFIG_RAW_TEXT,
                                     CONFIG_SIZE_OVERFLOW, CONFIG_UNDECODABLE, CONFIG_UNHASHABLE_BITS, CONFIG_UNKNOWN_USER, KNOWN, counted,
                                     examples, one_line, outcome, tolerate)

KNOWN_CONFIG_BUGS = (CONFIG_UNDECODABLE, CONFIG_SIZE_OVERFLOW, CONFIG_DURATION_OVERFLOW, CONFIG_INT_DIGITS,
                     CONFIG_UNKNOWN_USER, CONFIG_RAW_TEXT, CONFIG_UNHASHABLE_BITS)


class Raw(str):
    """A TOML literal written verbatim: an integer too long for str() (Python's 4300-digit limit)."""


HUGE_LITERAL = Raw("9" * 4301)


# --- a tiny TOML emitter (tomli_w is not a dependency) ----------------------------------------------------

def _escape(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_value(value: object) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _escape(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_escape(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def to_toml(doc: dict, path: tuple[str, ...] = ()) -> str:
    """Plain keys first, then each table under its [header] (tables two levels down stay inline)."""
    lines = [f"{_escape(k)} = {toml_value(v)}" for k, v in doc.items() if not (isinstance(v, dict) and len(path) < 2)]
    for key, value in doc.items():
        if isinstance(value, dict) and len(path) < 2:
            lines.append("[" + ".".join(_escape(p) for p in (*path, key)) + "]")
            lines.append(to_toml(value, (*path, key)))
    return "\n".join(line for line in lines if line) + "\n"


# --- strategies -------------------------------------------------------------------------------------------

TEXT = st.characters(codec="utf-8")  # TOML text cannot hold surrogates
text = st.text(TEXT, max_size=12)
huge_ints = st.sampled_from([2**31, 2**63 - 1, -(2**63), 2**64, 10**400, -(10**400)])
ints = st.integers(-10, 10) | st.integers() | huge_ints
floats = st.floats() | st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 1e308, 5e-324])
scalars = st.booleans() | ints | floats | text
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                      max_leaves=8)

sizes = st.sampled_from(["512MiB", "1GiB", "0", "24GiB", "1.5TB", "12", "-1GiB", "1e3MiB", "9" * 400 + "GiB", " 2 k ",
                         "0.5b", "64MiB", 0, 1024, 2**50 + 1, -1]) | ints
durations = st.sampled_from(["30m", "1h30m", "45s", "none", "off", "2d", "500ms", "soon", "1e309", "nan", "-5s",
                             "9" * 400, "9" * 400 + "s", 0, 30, 1.5, 10**400, float("nan"), float("inf")]) | ints | floats
names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True) | text
paths = st.sampled_from(["m.gguf", "models", ".", "~", "~/m.gguf", "~nosuchuser/m.gguf", "/nonexistent/x.gguf",
                         "a\x00b", ""]) | text
booleans = st.booleans()

GLOBAL = {
    "server_bin": text | paths, "host": st.sampled_from(["127.0.0.1", "0.0.0.0", "::1"]) | text,
    "port": st.integers(1, 65535) | ints, "port_start": st.integers(1, 65535) | ints,
    "max_instances": st.integers(-2, 1100) | ints, "max_queue": st.integers(-2, 100_001) | ints,
    "idle_ttl": durations, "poll_interval": durations, "load_timeout": durations, "max_body": sizes,
    "api_keys": st.lists(st.sampled_from(["k", "sk-1", "a b", ""]) | text, max_size=3),
    "instance_api_keys": booleans, "adopt": booleans, "models_dir": paths,
    "gpu_util_threshold": st.integers(-1, 101) | ints, "gpu_mem_threshold": st.floats(-0.5, 1.5) | floats | ints,
    "gpu_overhead": sizes, "host_memory": sizes, "calibration": booleans,
}
SETTINGS = {
    "ctx_size": st.integers(-1, 2**20) | ints, "n_gpu_layers": st.sampled_from(["all", "auto", -1, 0, 99]) | ints | text,
    "cache_type_k": st.sampled_from(["f16", "q8_0", "Q4_0", "bf16", "bogus"]) | text,
    "cache_type_v": st.sampled_from(["f16", "q8_0", "q4_1", "bogus"]) | text,
    "flash_attn": st.sampled_from(["on", "off", "auto", "AUTO", True, False, 1]) | text,
    "parallel": st.integers(0, 300) | ints, "batch_size": st.integers(0, 2**21) | ints,
    "ubatch_size": st.integers(0, 2**21) | ints,
    "args": st.lists(st.sampled_from(["--jinja", "--mlock", "-c", "--ctx-size=4", "--model", "-hf", "--rope-scaling"])
                     | text, max_size=3),
    "kv_unified": booleans, "embedding": booleans, "reranking": booleans, "swa_full": booleans, "no_mmap": booleans,
    "kv_offload": booleans, "repack": booleans, "n_cpu_moe": st.sampled_from(["all", 0, 3, -1]) | ints | text,
    "override_tensor": st.lists(st.sampled_from([r"blk\.0=CPU", "x=CUDA0,y=CPU", "(=CPU", "a=GPU", "=CPU", "a="])
                                | text, max_size=3),
    "tensor_split": st.lists(st.integers(0, 4) | floats | ints, max_size=4) | st.sampled_from(["3,1", "50:50", "1/1", ""])
                    | text,
    "strategy": st.sampled_from(["spread", "pack", "fill"]) | text, "max_gpus": st.integers(0, 1025) | ints,
    "gpus": st.lists(st.integers(-1, 1025) | ints, max_size=3), "no_partial": booleans, "margin": sizes, "calibration": booleans,
}
MODEL = {**SETTINGS, "path": paths, "ttl": durations,
         "aliases": st.lists(names | st.just("x" * 257), max_size=3), "lora": st.lists(paths, max_size=2)}
# every key the loader knows (a key added later gets booleans or any value until it is listed above)
GLOBAL = {k: GLOBAL.get(k, booleans | values) for k in _GLOBAL_KEYS - {"defaults", "models"}}
SETTINGS = {k: SETTINGS.get(k, booleans | values) for k in _SETTING_KEYS}
MODEL = {k: MODEL.get(k, SETTINGS.get(k, booleans | values)) for k in _MODEL_KEYS}


def rarely(draw, n: int) -> bool:
    """True about once in n draws (not 0: Hypothesis draws the low end of a range far more often)."""
    return draw(st.integers(0, n - 1)) == n // 2


@st.composite
def tables(draw, known: dict[str, st.SearchStrategy], max_keys: int = 6) -> dict:
    """Some of the real keys, mostly with plausible values, sometimes any value; rarely an unknown key."""
    out = {}
    for key in draw(st.lists(st.sampled_from(sorted(known)), unique=True, max_size=max_keys)):
        out[key] = draw(st.one_of(known[key], known[key], known[key], values))
    if rarely(draw, 10):
        out[draw(text)] = draw(values)
    if out and rarely(draw, 20):  # now and then an integer past Python's 4300-digit str() limit
        out[draw(st.sampled_from(sorted(out)))] = HUGE_LITERAL
    return out


@st.composite
def documents(draw) -> dict:
    doc = draw(tables(GLOBAL))
    if draw(st.booleans()):
        doc["defaults"] = draw(tables(SETTINGS) | values)
    if draw(st.booleans()):
        doc["models"] = draw(st.dictionaries(names, tables(MODEL) | values, max_size=3) | values)
    return doc


SEED_JSON = {"server_pool": st.fixed_dictionaries({}, optional={"size": st.integers(0, 9) | ints,
                                                                 "port_start": st.integers(1, 65535) | ints}) | values,
             "ctx_size": st.integers(0, 9999) | ints, "gpu_layers": st.integers(-1, 99) | ints | text,
             "cache_type_bits": st.sampled_from([32, 16, 8, 4, 3]) | values}


@st.composite
def seed_json_documents(draw) -> dict:
    """The seed spec's config.json shape: its own keys beside ours."""
    doc = draw(tables({**GLOBAL, **SEED_JSON}))
    if draw(st.booleans()):
        doc["models"] = draw(st.dictionaries(names, tables(MODEL) | values, max_size=3) | values)
    return doc


# --- helpers ----------------------------------------------------------------------------------------------

_dir = Path(tempfile.mkdtemp(prefix="llamactl-config-props-"))
atexit.register(shutil.rmtree, _dir, ignore_errors=True)
(_dir / "models").mkdir()
for _name in ("a.gguf", "big-00001-of-00002.gguf", "big-00002-of-00002.gguf", "..hidden.gguf"):
    (_dir / "models" / _name).write_bytes(b"")


def check_load(data: bytes, suffix: str) -> Config | ConfigError | object:
    """load() under the contract: a Config, a one-line ConfigError naming the file, or a known bug."""
    path = _dir / f"config{suffix}"
    path.write_bytes(data)
    result = outcome(lambda: load(path, required=True), expect=LlamactlError, known=KNOWN_CONFIG_BUGS)
    if result is KNOWN:
        return result
    if isinstance(result, LlamactlError):
        assert isinstance(result, ConfigError), f"{type(result).__name__}: {result}"
        if str(path) not in str(result):
            assert suffix == ".json" and tolerate(CONFIG_JSON_NO_PATH), f"no file name in: {result}"
        event(f"ConfigError: {str(result).removeprefix(str(path)).lstrip(':0123456789 ').split(':')[0][:30]}")
    else:
        assert isinstance(result, Config) and result.source == path
        event("Config")
    return result


# --- properties -------------------------------------------------------------------------------------------

def plain(value: object) -> object:
    """A value as tomllib reads it back (Raw literals are not compared; NaN compared by a marker)."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN-marker"
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def has_raw(value: object) -> bool:
    if isinstance(value, Raw):
        return True
    if isinstance(value, list):
        return any(has_raw(v) for v in value)
    if isinstance(value, dict):
        return any(has_raw(v) for v in value.values())
    return False


@settings(max_examples=examples(100))
@given(documents())
@counted
def test_the_toml_emitter_round_trips(doc: dict) -> None:
    """The generator's own check: what the properties below write is the document they mean."""
    if has_raw(doc):
        return
    assert plain(tomllib.loads(to_toml(doc))) == plain(doc)


@settings(max_examples=examples(400))
@given(documents())
@counted
def test_random_toml_documents_give_a_config_or_one_line_config_error(doc: dict) -> None:
    check_load(to_toml(doc).encode(), ".toml")


@settings(max_examples=examples(200))
@given(seed_json_documents() | documents())
@counted
def test_random_json_documents_give_a_config_or_one_line_config_error(doc: dict) -> None:
    text = json.dumps(doc).replace(f'"{HUGE_LITERAL}"', HUGE_LITERAL)  # the Raw literal as a bare number
    check_load(text.encode(), ".json")


@settings(max_examples=examples(200))
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | st.builds(lambda doc, cut: to_toml(doc).encode()[:cut], documents(), st.integers(0, 400)),
       st.sampled_from([".toml", ".json"]))
@counted
def test_random_bytes_give_a_config_or_one_line_config_error(data: bytes, suffix: str) -> None:
    check_load(data, suffix)


# --- regressions: the bugs these tests found, fixed ----------------------

KNOWN_BUG_FILES = {
    "config-undecodable": (b"\xff = 1\n", ".toml"),
    "config-size-overflow": (b'gpu_overhead = "' + b"9" * 400 + b'GiB"\n', ".toml"),
    "config-size-overflow(max_body)": (b'max_body = "' + b"9" * 400 + b'KiB"\n', ".toml"),
    "config-duration-overflow": (b"idle_ttl = " + b"9" * 400 + b"\n", ".toml"),
    "config-int-digits(toml)": (b"port = " + b"9" * 4301 + b"\n", ".toml"),
    "config-int-digits(json)": (b'{"port": ' + b"9" * 4301 + b"}", ".json"),
    "config-unknown-user-home": (b'models_dir = "~nosuchuser/models"\n', ".toml"),
    "config-unknown-user-home(path)": (b'[models.a]\npath = "~nosuchuser/a.gguf"\n', ".toml"),
    "config-raw-text-in-message(key)": (b'"a\\nb" = 1\n', ".toml"),
    "config-raw-text-in-message(model name)": (b'[models."a\\nb"]\npath = "x.gguf"\n', ".toml"),
    "config-raw-text-in-message(models_dir)": (b'models_dir = "a\\nb"\n', ".toml"),
    "config-json-error-without-path": (b'{"server_pool": 5}', ".json"),
    "config-json-unhashable-cache-bits": (b'{"cache_type_bits": []}', ".json"),
}


@pytest.mark.parametrize("bug", sorted(KNOWN_BUG_FILES))
def test_regression_config(tmp_path: Path, bug: str) -> None:
    data, suffix = KNOWN_BUG_FILES[bug]
    path = tmp_path / f"config{suffix}"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load(path, required=True)
    assert one_line(str(info.value)) and str(path) in str(info.value), str(info.value)
