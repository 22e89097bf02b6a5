"""``python -m taiyi``: the same as the ``taiyi`` command."""

import sys

from .cli import main

sys.exit(main())
