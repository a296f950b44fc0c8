import sys

from synhpc.cli import main

sys.exit(main())
