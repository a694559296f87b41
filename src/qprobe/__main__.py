import sys

from qprobe.cli import main

sys.exit(main())
