"""`python -m dostream.cli ARGS` is `dostream ARGS`."""

import sys

from dostream.cli.main import main

sys.exit(main())
