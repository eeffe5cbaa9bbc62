import sys

from bomstream.cli import main

sys.exit(main())
