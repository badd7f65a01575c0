"""Service configuration: command-line flags, each defaulting to an environment variable.

Every option has a flag and a ``COPS_*`` environment variable; the flag wins. Values are checked
when parsed (a wrong one exits with status 2 and names the flag and the variable). The backend
and precision names are checked by ``Detector.open`` itself, so this module never lists them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from cops_deploy.errors import ConfigError
from cops_deploy.imaging.decode import DEFAULT_MAX_PIXELS  # the one default (8192 x 8192)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "LOG_LEVELS",
    "ServiceCfg",
    "build_parser",
    "parse_cfg",
]

DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # a 24-bit 4K PNG is about 25 MB
LOG_LEVELS: tuple[str, ...] = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class ServiceCfg:
    """Everything the service needs; validated on construction (ConfigError).

    Attributes:
        bundle: the bundle directory to open.
        host, port: where to listen (127.0.0.1 by default: pass 0.0.0.0 to serve the network).
        backend: ``Detector.open``'s backend ('auto', 'onnxruntime', 'openvino', ...).
        precision: ``Detector.open``'s precision ('fp32', or 'bf16' with openvino).
        threads: intra-op threads of ONNX Runtime / OpenVINO; None: one per core.
        warmup: run one dummy image inside ``Detector.open`` (``warmup=True``), so the first
            request after a restart is served at the steady-state speed.
        max_upload_bytes: the largest request body accepted (413 above it).
        max_pixels: the largest image (width x height) decoded (422 above it).
        concurrency: predictions running at once (each in a worker thread).
        log_level: uvicorn's and the service's log level.
    """

    bundle: Path
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "auto"
    precision: str = "fp32"
    threads: int | None = None
    warmup: bool = True
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    concurrency: int = 2
    log_level: str = "info"

    def __post_init__(self) -> None:
        _check_int("port", self.port, 0, 65535)
        if self.threads is not None:
            _check_int("threads", self.threads, 1, None)
        if not isinstance(self.warmup, bool):
            raise ConfigError(
                f"invalid warmup={self.warmup!r}; valid: True or False. Fix: pass a bool."
            )
        _check_int("max_upload_bytes", self.max_upload_bytes, 1, None)
        _check_int("max_pixels", self.max_pixels, 1, Image.MAX_IMAGE_PIXELS)
        _check_int("concurrency", self.concurrency, 1, None)
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(
                f"invalid log_level={self.log_level!r}; valid: {', '.join(LOG_LEVELS)}. "
                f"Fix: pass one of those."
            )


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high  # type: ignore[operator]
    if not ok:
        valid = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
        raise ConfigError(f"invalid {name}={value!r}; valid: {valid}. Fix: pass {valid}.")


# ----------------------------------------------------------------------------------------------
# Command line and environment


def _integer(flag: str, env: str, low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in low..high, whose error names the flag and the variable."""

    def convert(text: str) -> int:
        valid = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {valid} (set by {flag} or the environment variable {env}). "
                f"Fix: give {valid}."
            )
        return value

    return convert


def _optional_threads(text: str) -> int | None:
    """'auto' or empty: None (one thread per core); otherwise an integer >= 1."""
    if text.strip().lower() in ("", "auto"):
        return None
    return _integer("--threads", "COPS_THREADS", 1)(text)


def _switch(text: str) -> bool:
    """'on' / 'off' (also 1/0, true/false, yes/no) as a bool, for --warmup and COPS_WARMUP."""
    value = {"on": True, "1": True, "true": True, "yes": True}.get(text.strip().lower())
    if value is None and text.strip().lower() not in ("off", "0", "false", "no"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not on or off (set by --warmup or the environment variable "
            f"COPS_WARMUP). Fix: give on or off."
        )
    return bool(value)


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The service's argument parser; defaults come from ``env`` (default: ``os.environ``)."""
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(
        prog="python -m cops_service",
        description="Serve a CoPS deployment bundle over HTTP (FastAPI + uvicorn). Each flag "
        "defaults to the environment variable in brackets.",
    )
    p.add_argument(
        "--bundle", type=Path, default=env.get("COPS_BUNDLE"), help="bundle directory [COPS_BUNDLE]"
    )
    p.add_argument(
        "--host",
        default=env.get("COPS_HOST", "127.0.0.1"),
        help="address to listen on; 0.0.0.0 serves the network [COPS_HOST] (default 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=_integer("--port", "COPS_PORT", 0, 65535),
        default=env.get("COPS_PORT", "8000"),
        help="TCP port [COPS_PORT] (default 8000)",
    )
    p.add_argument(
        "--backend",
        default=env.get("COPS_BACKEND", "auto"),
        help="Detector backend: auto, tensorrt, onnxruntime, openvino, torch [COPS_BACKEND] "
        "(default auto)",
    )
    p.add_argument(
        "--precision",
        default=env.get("COPS_PRECISION", "fp32"),
        help="fp32, or bf16 with --backend openvino [COPS_PRECISION] (default fp32)",
    )
    p.add_argument(
        "--threads",
        type=_optional_threads,
        default=env.get("COPS_THREADS", "auto"),
        help="intra-op threads of ONNX Runtime/OpenVINO, or auto (one per core) [COPS_THREADS]",
    )
    p.add_argument(
        "--warmup",
        type=_switch,
        default=env.get("COPS_WARMUP", "on"),
        help="on: run one dummy image while opening, so the first request is served at the "
        "steady-state speed; off: open faster [COPS_WARMUP] (default on)",
    )
    p.add_argument(
        "--max-upload-bytes",
        type=_integer("--max-upload-bytes", "COPS_MAX_UPLOAD_BYTES", 1),
        default=env.get("COPS_MAX_UPLOAD_BYTES", str(DEFAULT_MAX_UPLOAD_BYTES)),
        help=f"largest request body; 413 above it [COPS_MAX_UPLOAD_BYTES] "
        f"(default {DEFAULT_MAX_UPLOAD_BYTES})",
    )
    p.add_argument(
        "--max-pixels",
        type=_integer("--max-pixels", "COPS_MAX_PIXELS", 1, Image.MAX_IMAGE_PIXELS),
        default=env.get("COPS_MAX_PIXELS", str(DEFAULT_MAX_PIXELS)),
        help=f"largest image, width x height; 422 above it [COPS_MAX_PIXELS] "
        f"(default {DEFAULT_MAX_PIXELS}, at most Pillow's {Image.MAX_IMAGE_PIXELS})",
    )
    p.add_argument(
        "--concurrency",
        type=_integer("--concurrency", "COPS_CONCURRENCY", 1),
        default=env.get("COPS_CONCURRENCY", "2"),
        help="predictions running at once, each in a worker thread [COPS_CONCURRENCY] (default 2)",
    )
    p.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=env.get("COPS_LOG_LEVEL", "info"),
        help="log level [COPS_LOG_LEVEL] (default info)",
    )
    return p


def parse_cfg(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> ServiceCfg:
    """Parse flags (and the environment) into a :class:`ServiceCfg`; exits 2 on a bad value."""
    parser = build_parser(env)
    args = parser.parse_args(argv)
    if args.bundle is None:
        parser.error(
            "no bundle given. Fix: pass --bundle DIR or set COPS_BUNDLE=DIR (a folder written by "
            "cops-export, with manifest.json)."
        )
    if args.log_level not in LOG_LEVELS:  # a COPS_LOG_LEVEL default is not checked by choices
        parser.error(
            f"invalid log level {args.log_level!r} (--log-level or COPS_LOG_LEVEL); valid: "
            f"{', '.join(LOG_LEVELS)}."
        )
    return ServiceCfg(
        bundle=args.bundle,
        host=args.host,
        port=args.port,
        backend=args.backend,
        precision=args.precision,
        threads=args.threads,
        warmup=args.warmup,
        max_upload_bytes=args.max_upload_bytes,
        max_pixels=args.max_pixels,
        concurrency=args.concurrency,
        log_level=args.log_level,
    )
