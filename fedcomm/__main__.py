"""``python -m fedcomm``: the ``fedcomm`` command."""

import sys

from fedcomm.commands import main

sys.exit(main())
