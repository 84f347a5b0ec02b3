"""``python -m mmbridge ...``: the same sub-commands as the ``mmbridge`` command."""

import sys

from mmbridge.cli import main

sys.exit(main())
