"""`python scripts/compare.py`: the module `mfac_glue.experiments.compare`, also the console script `mfac-compare`."""
import sys

from mfac_glue.experiments.compare import main

sys.exit(main())
