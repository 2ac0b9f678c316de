import sys

from streamasr.tools.importers import main

sys.exit(main())
