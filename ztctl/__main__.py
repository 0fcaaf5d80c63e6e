import sys

from ztctl.cli import main

sys.exit(main())
