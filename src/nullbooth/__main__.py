import sys

from nullbooth.cli.main import main

sys.exit(main())
