import sys

from modelpress.cli import main

sys.exit(main())
