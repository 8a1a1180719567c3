import sys

from upo.frontier.cli import main

sys.exit(main())
