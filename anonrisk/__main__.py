import sys

from anonrisk.cli import main

sys.exit(main())
