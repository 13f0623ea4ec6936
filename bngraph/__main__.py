import sys

from bngraph.cli import main

sys.exit(main())
