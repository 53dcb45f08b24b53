"""`python -m dostream ARGS` is `dostream ARGS`."""

import sys

from dostream.cli.main import main

sys.exit(main())
