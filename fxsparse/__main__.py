import sys

from fxsparse.tools.cli import main

sys.exit(main())
