"""`python scripts/controls.py`: the module `mfac_glue.experiments.controls`, also the console script `mfac-controls`."""
import sys

from mfac_glue.experiments.controls import main

sys.exit(main())
