"""``python -m stream_worker`` is the ``stream-worker`` command."""

import sys

from .cli import main

sys.exit(main())
