import sys

from pg_tune.cli import main

sys.exit(main())
