import sys

from carod.cli import main

sys.exit(main())
