"""``python -m taiyi.serve ...``: the same command as ``taiyi serve`` (used by the load test's server process)."""

from __future__ import annotations

import sys

from taiyi.serve_cli import main

if __name__ == "__main__":
    sys.exit(main())
