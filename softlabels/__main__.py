"""``python -m softlabels``: the same as the ``softlabels`` command."""

import sys

from softlabels.cli import main

sys.exit(main())
