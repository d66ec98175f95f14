import sys

from gensuite.cli import main

sys.exit(main())
