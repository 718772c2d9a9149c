import sys

from edgefilter.cli import main

sys.exit(main())
