"""``python -m statehost.server serve``: same as the ``statehost`` command."""

import sys

from statehost.server.cli import main

sys.exit(main())
