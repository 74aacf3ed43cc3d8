"""``python -m stream_worker`` is the ``stream-worker`` command."""

import sys

from stream_worker.cli import main

sys.exit(main())
