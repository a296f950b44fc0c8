from synhpc.cli import main
import sys

sys.exit(main())
