import sys

from velo_scale.cli import main

sys.exit(main())
