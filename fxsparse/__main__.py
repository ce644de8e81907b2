import sys

from fxsparse.cli import main

sys.exit(main())
