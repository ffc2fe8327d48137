"""`python -m appliance.cli`: what tests and `adpop up` run."""

import sys

from appliance.cli import main

sys.exit(main())
