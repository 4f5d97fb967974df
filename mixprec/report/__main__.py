"""``python -m mixprec.report RESULTS_DIR [--out DIR]``; the report is built in :mod:`.build`."""

import sys

from .build import main

sys.exit(main())
