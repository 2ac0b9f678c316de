import sys

from streamasr.importers import main

sys.exit(main())
