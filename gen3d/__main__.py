import sys

from gen3d.cli import main

sys.exit(main())
