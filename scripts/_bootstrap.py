"""Let the guide's scripts run from a checkout where vlcache is not installed."""

import sys
from pathlib import Path

try:
    import vlcache  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
