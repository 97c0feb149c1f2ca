import sys

from segplatform.cli import main

sys.exit(main())
