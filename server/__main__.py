"""``python -m statehost.server COMMAND``: the same as the ``statehost`` command."""

import sys

from statehost._cli import main

sys.exit(main())
