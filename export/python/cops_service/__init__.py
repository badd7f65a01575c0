"""CoPS edge service: one Detector behind a small FastAPI app (health, ready, describe, predict).

Run it with ``python -m cops_service --bundle DIR`` (see README.md), or build the app yourself::

    from cops_service import ServiceCfg, create_app
    app = create_app(ServiceCfg(bundle=Path("bundle/")))   # then serve it with any ASGI server
"""

from __future__ import annotations

from .app import create_app
from .settings import ServiceCfg, parse_cfg

__all__ = ["ServiceCfg", "create_app", "parse_cfg"]
