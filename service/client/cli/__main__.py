"""`python -m service.client.cli ...`: the `lbgat` command."""

import sys

from service.client.cli import main

sys.exit(main())
