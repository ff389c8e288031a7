import sys

from fedsec.cli import main

sys.exit(main())
