"""``python -m cops_service``: serve a bundle over HTTP until SIGINT/SIGTERM.

SIGINT or SIGTERM stops it gracefully (requests in flight finish, the Detector is closed); uvicorn
then re-raises the signal, so the exit is by that signal, as a supervisor expects. Otherwise the
exit status is 1 when the Detector cannot open the bundle (the message is printed) or the port
cannot be bound, and 2 for invalid flags or environment variables.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvicorn

from cops_service.app import create_app
from cops_service.settings import parse_cfg

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the settings, open the bundle in the background and serve until stopped."""
    cfg = parse_cfg(argv)
    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    failures: list[str] = []
    server: uvicorn.Server | None = None

    def stop_on_failure(message: str) -> None:
        failures.append(message)
        if server is not None:
            server.should_exit = True  # uvicorn's main loop polls this flag

    app = create_app(cfg, on_open_failure=stop_on_failure)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    server = uvicorn.Server(config)
    server.run()
    if failures:
        print(f"cops_service: cannot serve bundle {cfg.bundle}: {failures[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
