"""The user's settings: environment variables, then a TOML config file, then built-in defaults.

Every setting has an environment variable (`DIALOGUE_MODEL`...) and a key in the config file
(`model = "claude-sonnet-4-5"`). The file is `config.toml` in the user's config directory
(platformdirs: `~/.config/dialogue/config.toml` on Linux), or the file `DIALOGUE_CONFIG` names.
An environment variable wins over the file, the file over the default.

`apply()` (the CLI calls it first thing, so `dialogue serve` and every command follow it) copies
each key of the file into its environment variable when that variable is not set. The code that
reads a setting keeps reading the environment, and the processes we start (the local model's
process, kernels) inherit it, so one rule covers them all.

Settings only the test suite uses (`DIALOGUE_TEST_HOOKS`, `DIALOGUE_TEST_CRASH_FILE`) have no
key: a config file cannot switch them on.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, MutableMapping

__all__ = ["Setting", "SETTINGS", "ConfigError", "config_path", "read_file", "apply", "get",
           "version"]

CONFIG_ENV = "DIALOGUE_CONFIG"


class ConfigError(ValueError):
    """A config file that cannot be read, or a key or value in it that is wrong."""


@dataclass(frozen=True)
class Setting:
    key: str             # in config.toml
    env: str             # the environment variable
    type: type           # what the file's value must be: str, int, float or bool
    default: str         # in words, for the README and --help
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("db", "DIALOGUE_DB", str, "dialogue.db in the user data directory",
            "the database file (`--db` wins over both)"),
    Setting("home", "DIALOGUE_HOME", str, "the user data directory",
            "where the model and adapter registries and the registry's adapter files live"),
    Setting("model", "DIALOGUE_MODEL", str, "local:default (the bundled SmolLM2)",
            "the model of a new dialogue"),
    Setting("stop_grace", "DIALOGUE_STOP_GRACE", float, "5",
            "seconds Stop waits for an interrupted cell before it restarts the kernel"),
    Setting("cache_dir", "DIALOGUE_CACHE_DIR", str, "the user cache directory",
            "where the local model's prefix KV states are saved"),
    Setting("kv_cache_max_bytes", "DIALOGUE_KV_CACHE_MAX_BYTES", int, "4 GiB",
            "the size the KV cache is trimmed to"),
    Setting("threads", "DIALOGUE_THREADS", int, "half the CPUs (decode), all but one (prompt)",
            "CPU threads the local model uses"),
    Setting("gpu_layers", "DIALOGUE_GPU_LAYERS", int, "all with a GPU build, else 0",
            "layers of the local model offloaded to the GPU (-1: all)"),
    Setting("llama_repack", "DIALOGUE_LLAMA_REPACK", bool, "false",
            "let llama.cpp repack weights into extra (AMX) CPU buffers"),
    Setting("kernel_no_cgroup", "DIALOGUE_KERNEL_NO_CGROUP", bool, "false",
            "track a kernel's processes with a subreaper even where a cgroup would work"),
    Setting("kernel_iopub_hwm", "DIALOGUE_KERNEL_IOPUB_HWM", int, "100000",
            "messages a kernel queues for a slow reader before ZeroMQ drops its output"),
    Setting("gateway_url", "DIALOGUE_GATEWAY_URL", str, "none",
            "a Jupyter Server or Kernel Gateway whose kernels dialogues may choose "
            "(`dialogue kernel NAME --gateway SPEC`)"),
    Setting("gateway_token", "DIALOGUE_GATEWAY_TOKEN", str, "none",
            "the token that gateway asks for (sent as `Authorization: token ...`)"),
    Setting("dialogue", "DIALOGUE_DIALOGUE", str, "set in each dialogue's kernel to its id",
            "the dialogue `dialogue.here` reads and edits (with `DIALOGUE_DB`, its database)"),
    Setting("vllm_max_lora_rank", "DIALOGUE_VLLM_MAX_LORA_RANK", int, "16",
            "the --max-lora-rank of the vLLM servers you use: a merged adapter set over it is refused"),
    Setting("engine_adapter_dir", "DIALOGUE_ENGINE_ADAPTER_DIR", str, "engine-adapters in the data dir",
            "where adapter sets merged for vLLM are written: a path the server can read"),
    Setting("log_level", "DIALOGUE_LOG_LEVEL", str, "warning",
            "the `dialogue.*` log level (debug, info, warning, error; `-v` / `--log-level` win)"),
    Setting("access_log", "DIALOGUE_ACCESS_LOG", bool, "false",
            "`dialogue serve`: one JSON line per request on stderr (`--access-log` wins)"),
    Setting("vision_models", "DIALOGUE_VISION_MODELS", str, "none",
            "openai-compatible models that can see images (full names; * matches any text)"),
    Setting("context_window", "DIALOGUE_CONTEXT_WINDOW", str, "none",
            "hosted models' context in tokens: PATTERN=TOKENS entries (the full model name, * "
            "matches any text), or TOKENS for any model whose window is not known"),
    Setting("sse_ping", "DIALOGUE_SSE_PING", float, "15",
            "`dialogue serve`: seconds between keep-alive comments on a quiet event stream"),
    Setting("mcp_config", "DIALOGUE_MCP_CONFIG", str, "mcp.json beside config.toml",
            "the global MCP servers file (the `mcpServers` JSON shape)"),
    Setting("mcp_start_timeout", "DIALOGUE_MCP_START_TIMEOUT", float, "30",
            "seconds an MCP server gets to start and list its tools"),
    Setting("mcp_call_timeout", "DIALOGUE_MCP_CALL_TIMEOUT", float, "60",
            "seconds an MCP tool call gets before it fails (and its server is restarted)"),
)
_BY_KEY = {s.key: s for s in SETTINGS}
_BY_ENV = {s.env: s for s in SETTINGS}


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    """`DIALOGUE_CONFIG` if set, else config.toml in the user's config directory."""
    env = os.environ if environ is None else environ
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser()
    import platformdirs
    return Path(platformdirs.user_config_dir("dialogue", appauthor=False)) / "config.toml"


def _as_env(s: Setting, v: Any, path: Path) -> str:
    """A file's value as its environment variable would hold it; a value of the wrong type is
    refused with the key, the file and what it should be."""
    ok = {str: isinstance(v, str), bool: isinstance(v, bool),
          int: isinstance(v, int) and not isinstance(v, bool),
          float: isinstance(v, (int, float)) and not isinstance(v, bool)}[s.type]
    if not ok:
        raise ConfigError(f"{path}: {s.key} must be {s.type.__name__ if s.type is not str else 'a string'}"
                          f", not {v!r}")
    if s.type is bool:
        return "1" if v else "0"
    return str(v)


def read_file(path: Path | None = None) -> dict[str, str]:
    """The config file as {environment variable: value}; {} when there is no file. A file that is
    not TOML, or has an unknown key or a value of the wrong type, raises ConfigError naming it
    (a typo must not be ignored silently)."""
    p = config_path() if path is None else path
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"cannot read the config file {p}: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"the config file {p} is not valid TOML: {e}") from None
    out: dict[str, str] = {}
    for k, v in data.items():
        s = _BY_KEY.get(k)
        if s is None:
            raise ConfigError(f"{p}: unknown setting {k!r} (known: {', '.join(_BY_KEY)})")
        out[s.env] = _as_env(s, v, p)
    return out


def apply(environ: MutableMapping[str, str] | None = None, path: Path | None = None) -> dict[str, str]:
    """Copy the config file's settings into the environment where it does not set them already
    (the environment wins). Returns what it set."""
    env = os.environ if environ is None else environ
    added = {k: v for k, v in read_file(path if path is not None else config_path(env)).items()
             if k not in env}
    env.update(added)
    return added


def get(key: str, environ: Mapping[str, str] | None = None) -> str | None:
    """A setting's value now (its environment variable, which `apply` has filled from the file);
    None when neither sets it (the code that reads it has the default)."""
    v = (os.environ if environ is None else environ).get(_BY_KEY[key].env, "").strip()
    return v or None


def flag(key: str, environ: Mapping[str, str] | None = None) -> bool:
    """A yes/no setting: 1, true, yes, on are yes."""
    return (get(key, environ) or "").lower() in ("1", "true", "yes", "on")


def version() -> str:
    """The installed dialogue's version: `dialogue.__version__` (the one source of it)."""
    import dialogue
    return dialogue.__version__
