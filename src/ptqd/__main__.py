import sys

from ptqd.cli import main

sys.exit(main())
