"""Script form of ``python -m cops_service``: ``python export/python/serve.py --bundle DIR``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the cops_service package beside it

from cops_service.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
