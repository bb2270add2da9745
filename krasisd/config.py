"""Every setting of krasisd, in one place.

Each setting is read from the environment (``KRASIS_*``), else from the optional config
file (TOML, ``$KRASIS_CONFIG`` or ``$KRASIS_HOME/config.toml``, keys are the variable
names without the ``KRASIS_`` prefix, in lower case), else it takes its default. A bad
value logs a warning and falls back to the default: a typo must not keep the daemon from
starting. The one exception is KRASIS_HOST (:class:`ConfigError`): a listener the user asked
for must not silently stay off. ``docs/settings.md`` explains every default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from krasisd.address import format_address, host_name, parse_host

log = logging.getLogger(__name__)

KEEP_ALIVE_DEFAULT_S = 30 * 60.0
# A keep-alive longer than this is forever (as Ollama treats huge values): a model kept for
# centuries is kept forever, and no date or timer overflows computing when it unloads.
KEEP_ALIVE_FOREVER_AFTER_S = 100 * 365 * 24 * 3600.0
MAX_CONNECTIONS_DEFAULT = 2048
HEADER_TIMEOUT_DEFAULT_S = 30.0
BODY_TIMEOUT_DEFAULT_S = 60.0
DEFAULT_RUNNER_LOADER = "krasisd.engine.serving:load_for_serving"
# Where a hybrid GPU+CPU load takes its dense linears from (KRASIS_GPU_DENSE; load_hybrid's
# ``dense``): the CPU cache's quantized copies, or the checkpoint's bf16 weights. The one list,
# here because this module is light; krasisd.engine.gpu.graphs imports it as DENSE_WEIGHTS.
GPU_DENSE_WEIGHTS = ("quant", "bf16")
DEFAULT_GPU_DENSE = GPU_DENSE_WEIGHTS[0]
# The engine's own lists (krasisd.engine.engine_options.EngineOptions checks against them).
QUANTS = ("none", "int8", "int4")  # KRASIS_QUANT: routed-expert formats
DEVICES = ("auto", "cpu", "cuda")  # KRASIS_DEVICE
# KRASIS_GPU_PREFILL_MIN_TOKENS: prompts from this length stream their experts through the GPU;
# shorter ones take the decode path (provisional, until both are measured side by side).
DEFAULT_GPU_PREFILL_MIN_TOKENS = 32

_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS_S = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_duration_s(value: Any) -> float:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "-1").

    A negative value means forever (returned as ``float("inf")``). Raises ValueError.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds = _parse_go_duration_s(text)
    else:
        raise ValueError(f"invalid duration {value!r}: use seconds or a string like '5m'")
    if seconds != seconds:  # NaN
        raise ValueError(f"invalid duration {value!r}")
    return float("inf") if seconds < 0 else seconds


def parse_keep_alive_s(value: Any) -> float:
    """A keep-alive duration (parse_duration_s); one beyond KEEP_ALIVE_FOREVER_AFTER_S is
    forever (``inf``), so every stored keep-alive is finite and small, or ``inf``."""
    seconds = parse_duration_s(value)
    return float("inf") if seconds > KEEP_ALIVE_FOREVER_AFTER_S else seconds


def _parse_go_duration_s(text: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    pos, total = 0, 0.0
    while pos < len(body):
        match = _DURATION_RE.match(body, pos)
        if not match:
            raise ValueError(f"invalid duration {text!r}: use seconds or a string like '5m'")
        total += float(match.group(1)) * _DURATION_UNITS_S[match.group(2)]
        pos = match.end()
    if not body:
        raise ValueError("invalid duration ''")
    return sign * total


def parse_size_bytes(value: Any) -> int:
    """A byte count: 1073741824, "16GiB", "512M", "1.5GB". Raises ValueError."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"invalid size {value!r}: use bytes or a string like '16GiB'")
    unit = (match.group(2) or "").lower().rstrip("b")
    if not unit:
        return int(float(match.group(1)))
    power = "kmgt".index(unit[0]) + 1
    base = 1024 if unit.endswith("i") else 1000
    return int(float(match.group(1)) * base**power)


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback IP addresses."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def num_parallel_value(value: Any, *, text: bool = False) -> int:
    """The number of requests one runner serves at once (KRASIS_NUM_PARALLEL, the runner's
    ``--num-parallel``), checked: an int >= 1; with ``text``, also the text of one (from the
    environment, the config file or a command line). Every caller gets this one ValueError."""
    number = value
    if text and isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError("num_parallel (requests one runner serves at once, KRASIS_NUM_PARALLEL) "
                         f"must be a positive integer, got {value!r}")
    return number


def gpu_dense_value(value: Any) -> str:
    """Where hybrid loads take their dense linears from (KRASIS_GPU_DENSE, the runner's
    ``--gpu-dense``, load_for_serving's ``gpu_dense``), checked: one of GPU_DENSE_WEIGHTS, in
    any case and with spaces around. Every caller gets this one ValueError."""
    text = value.strip().lower() if isinstance(value, str) else None
    if text not in GPU_DENSE_WEIGHTS:
        raise ValueError("gpu_dense (the dense weights of hybrid GPU+CPU loads, KRASIS_GPU_DENSE) "
                         f"must be one of {', '.join(GPU_DENSE_WEIGHTS)}, got {value!r}")
    return text


def default_home(env: dict[str, str] | None = None) -> Path:
    """KRASIS_HOME, else $XDG_DATA_HOME/krasis, else ~/.local/share/krasis.

    The one definition, used by the daemon and the registry alike; it lives here because
    this module needs only the standard library (the engine imports it where the registry's
    dependencies are not installed).
    """
    env = os.environ if env is None else env
    if env.get("KRASIS_HOME"):
        return Path(env["KRASIS_HOME"]).expanduser()
    data = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data).expanduser() / "krasis"


def default_socket(home: Path, env: dict[str, str] | None = None) -> Path:
    """$XDG_RUNTIME_DIR/krasis/krasisd.sock, else $KRASIS_HOME/krasisd.sock."""
    runtime = (os.environ if env is None else env).get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "krasis" / "krasisd.sock"
    return home / "krasisd.sock"


@dataclass
class Config:
    """The effective settings of one daemon; see docs/settings.md for each."""

    home: Path = field(default_factory=default_home)
    socket: Path | None = None  # None: default_socket(home)
    socket_group: str = ""  # non-empty: socket mode 0660 owned by this group (system service)
    host: str = ""  # "" = no TCP listener
    allow_remote: bool = False  # a non-loopback KRASIS_HOST needs this explicit opt-in
    allowed_hosts: list[str] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    keep_alive_s: float = KEEP_ALIVE_DEFAULT_S
    max_queue: int = 512
    max_loaded: int = 2
    num_parallel: int = 4  # requests one runner serves at once (decode steps shared)
    kv_budget_bytes: int | None = None  # None: the runner's (half the available RAM on the CPU)
    prefill_chunk_tokens: int | None = None  # None: the engine's (512 on the CPU, 2048 on CUDA)
    prefix_cache_bytes: int | None = None  # None: the runner's (1/8 of the available RAM); 0: off
    preload: list[str] = field(default_factory=list)
    vram_budget_bytes: int | None = None  # None: the engine uses what is free minus a margin
    memory_budget_bytes: int | None = None  # None: the hardware probe's total RAM + VRAM
    threads: int | None = None  # None: the engine's default (cores - 1)
    quant: str = "int4"
    device: str = "auto"
    gpu_dense: str = DEFAULT_GPU_DENSE  # one of GPU_DENSE_WEIGHTS
    gpu_prefill_min_tokens: int = DEFAULT_GPU_PREFILL_MIN_TOKENS
    moe_autotune: bool = True  # time the GPU kernels' tiles (off: fixed tiles)
    max_body_bytes: int = 16 * 1024 * 1024
    max_connections: int = MAX_CONNECTIONS_DEFAULT  # more get HTTP 503 at once
    header_timeout_s: float = HEADER_TIMEOUT_DEFAULT_S  # a connection without a request's headers
    body_timeout_s: float = BODY_TIMEOUT_DEFAULT_S  # a request body must arrive within this
    load_timeout_s: float = 600.0
    room_timeout_s: float = 600.0  # a load's wait for a busy model to become idle
    log_level: str = "INFO"
    log_format: str = "text"
    runner_loader: str = DEFAULT_RUNNER_LOADER
    create_dirs: list[str] | None = None  # folders create may read; None: any over the socket,
    # none over TCP (krasis_registry.sources.SourcePolicy)
    config_file: Path | None = None

    def __post_init__(self):
        if self.socket is None:
            self.socket = default_socket(self.home)
        num_parallel_value(self.num_parallel)
        self.gpu_dense = gpu_dense_value(self.gpu_dense)

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """(host, port) of the TCP listener, or None when it is off."""
        return parse_host(self.host) if self.host else None

    def as_log_dict(self) -> dict[str, Any]:
        """The settings as plain values, for the start-up log line."""
        out = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            out[item.name] = str(value) if isinstance(value, Path) else value
        return out


class _Reader:
    """Typed look-ups over the environment, then the config file, then the default."""

    def __init__(self, env: dict[str, str], file_values: dict[str, Any]):
        self.env = env
        self.file_values = file_values

    def raw(self, name: str) -> Any:
        if name in self.env and self.env[name] != "":
            return self.env[name]
        return self.file_values.get(name.removeprefix("KRASIS_").lower())

    def get(self, name: str, default: Any, parse) -> Any:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            return parse(raw)
        except (ValueError, TypeError) as exc:
            log.warning("bad setting, using the default", extra={
                "setting": name, "value": raw, "default": default, "reason": str(exc)})
            return default


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


def _int_at_least(minimum: int):
    def parse(raw: Any) -> int:
        if isinstance(raw, bool):
            raise ValueError(f"not an integer: {raw!r}")
        value = int(raw)
        if value < minimum:
            raise ValueError(f"must be >= {minimum}")
        return value
    return parse


def _positive_size(raw: Any) -> int:
    value = parse_size_bytes(raw)
    if value < 1:
        raise ValueError("must be at least 1 byte")
    return value


def _num_parallel_text(raw: Any) -> int:
    return num_parallel_value(raw, text=True)


def _list(raw: Any) -> list[str]:
    items = raw if isinstance(raw, list) else str(raw).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def _choice(*choices: str):
    def parse(raw: Any) -> str:
        text = str(raw).strip().lower()
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text
    return parse


def _positive_size(raw: Any) -> int:
    value = parse_size_bytes(raw)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _positive_duration(raw: Any) -> float:
    value = parse_duration_s(raw)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _timeout(raw: Any) -> float:
    """A positive, finite duration (a timeout must end)."""
    value = _positive_duration(raw)
    if value == float("inf"):
        raise ValueError("must be a finite duration")
    return value


class ConfigError(ValueError):
    """A setting the daemon must not start with; the message names it and says why."""


def _host(raw: Any) -> str:
    """KRASIS_HOST as 'host:port' (krasisd.address's forms), or '' for off."""
    text = str(raw).strip()
    if text.lower() in ("", "0", "off", "false", "no"):
        return ""
    return format_address(*parse_host(text))


def _host_setting(read: _Reader) -> str:
    """KRASIS_HOST, checked: a value that cannot be read stops the daemon (ConfigError)."""
    raw = read.raw("KRASIS_HOST")
    if raw is None:
        return ""
    try:
        return _host(raw)
    except ValueError as exc:
        raise ConfigError(f"KRASIS_HOST={raw!r} cannot be read: {exc}; use host:port, :port "
                          "or http://host:port (e.g. 127.0.0.1:11434)") from None


def _host_names(raw: Any) -> list[str]:
    """KRASIS_ALLOWED_HOSTS entries as the Host check compares them (krasisd.address)."""
    return [host_name(item) for item in _list(raw)]


def _folder_list(raw: Any) -> list[str]:
    """Absolute folders, ':'-separated (as PATH) or a TOML list. A relative entry is left out
    with a warning (never raised: the fallback default would allow more, not less)."""
    items = raw if isinstance(raw, list) else str(raw).split(os.pathsep)
    folders = [str(Path(str(item).strip()).expanduser()) for item in items if str(item).strip()]
    for folder in folders:
        if not folder.startswith("/"):
            log.warning("bad setting entry left out: not an absolute folder",
                        extra={"setting": "KRASIS_CREATE_DIRS", "value": folder})
    return [folder for folder in folders if folder.startswith("/")]


def _loader(raw: Any) -> str:
    text = str(raw).strip()
    if text.count(":") != 1 or not all(text.split(":")):
        raise ValueError("must be 'module:function'")
    return text


def _read_file(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        import tomllib
    except ImportError:  # Python 3.10
        log.warning("config file ignored: tomllib needs Python 3.11", extra={"path": str(path)})
        return {}
    try:
        with path.open("rb") as fh:
            return {str(k).lower(): v for k, v in tomllib.load(fh).items()}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        log.warning("config file ignored", extra={"path": str(path), "reason": str(exc)})
        return {}


def load_config(env: dict[str, str] | None = None) -> Config:
    """Build the effective Config from the environment and the optional config file."""
    env = dict(os.environ if env is None else env)
    home = default_home(env)
    config_path = Path(env["KRASIS_CONFIG"]).expanduser() if env.get("KRASIS_CONFIG") \
        else home / "config.toml"
    read = _Reader(env, _read_file(config_path))
    socket_raw = read.raw("KRASIS_SOCKET")
    cfg = Config(
        home=home,
        socket=Path(str(socket_raw)).expanduser() if socket_raw else default_socket(home, env),
        socket_group=read.get("KRASIS_SOCKET_GROUP", "", str),
        host=_host_setting(read),
        allow_remote=read.get("KRASIS_ALLOW_REMOTE", False, _bool),
        allowed_hosts=read.get("KRASIS_ALLOWED_HOSTS", [], _host_names),
        origins=read.get("KRASIS_ORIGINS", [], _list),
        keep_alive_s=read.get("KRASIS_KEEP_ALIVE", KEEP_ALIVE_DEFAULT_S, parse_keep_alive_s),
        max_queue=read.get("KRASIS_MAX_QUEUE", 512, _int_at_least(1)),
        max_loaded=read.get("KRASIS_MAX_LOADED", 2, _int_at_least(1)),
        num_parallel=read.get("KRASIS_NUM_PARALLEL", 4, _num_parallel_text),
        kv_budget_bytes=read.get("KRASIS_KV_BUDGET", None, _positive_size),
        prefill_chunk_tokens=read.get("KRASIS_PREFILL_CHUNK_TOKENS", None, _int_at_least(1)),
        prefix_cache_bytes=read.get("KRASIS_PREFIX_CACHE", None, parse_size_bytes),
        preload=read.get("KRASIS_PRELOAD", [], _list),
        vram_budget_bytes=read.get("KRASIS_VRAM_BUDGET", None, _positive_size),
        memory_budget_bytes=read.get("KRASIS_MEMORY_BUDGET", None, parse_size_bytes),
        threads=read.get("KRASIS_THREADS", None, _int_at_least(1)),
        quant=read.get("KRASIS_QUANT", "int4", _choice(*QUANTS)),
        device=read.get("KRASIS_DEVICE", "auto", _choice(*DEVICES)),
        gpu_dense=read.get("KRASIS_GPU_DENSE", DEFAULT_GPU_DENSE, gpu_dense_value),
        gpu_prefill_min_tokens=read.get("KRASIS_GPU_PREFILL_MIN_TOKENS",
                                        DEFAULT_GPU_PREFILL_MIN_TOKENS, _int_at_least(1)),
        moe_autotune=read.get("KRASIS_MOE_AUTOTUNE", True, _bool),
        max_body_bytes=read.get("KRASIS_MAX_BODY", 16 * 1024 * 1024, parse_size_bytes),
        max_connections=read.get("KRASIS_MAX_CONNECTIONS", MAX_CONNECTIONS_DEFAULT,
                                 _int_at_least(1)),
        header_timeout_s=read.get("KRASIS_HEADER_TIMEOUT", HEADER_TIMEOUT_DEFAULT_S, _timeout),
        body_timeout_s=read.get("KRASIS_BODY_TIMEOUT", BODY_TIMEOUT_DEFAULT_S, _timeout),
        load_timeout_s=read.get("KRASIS_LOAD_TIMEOUT", 600.0, _positive_duration),
        room_timeout_s=read.get("KRASIS_ROOM_TIMEOUT", 600.0, _positive_duration),
        log_level=read.get("KRASIS_LOG_LEVEL", "INFO",
                           lambda r: _choice("debug", "info", "warning", "error")(r).upper()),
        log_format=read.get("KRASIS_LOG_FORMAT", "text", _choice("text", "json")),
        runner_loader=read.get("KRASIS_RUNNER_LOADER", DEFAULT_RUNNER_LOADER, _loader),
        create_dirs=read.get("KRASIS_CREATE_DIRS", None, _folder_list),
        config_file=config_path if config_path.is_file() else None,
    )
    _check_host(cfg)
    return cfg


def _check_host(cfg: Config) -> None:
    """A non-loopback TCP address needs KRASIS_ALLOW_REMOTE=1; without it TCP stays off."""
    address = cfg.tcp_address
    if address is None or is_loopback(address[0]):
        return
    if not cfg.allow_remote:
        log.warning("KRASIS_HOST is not a loopback address; TCP listener left off "
                    "(set KRASIS_ALLOW_REMOTE=1 to expose the API)", extra={"host": cfg.host})
        cfg.host = ""
    else:
        log.warning("the API is reachable from the network without authentication",
                    extra={"host": cfg.host})
