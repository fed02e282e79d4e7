"""`python scripts/sweep.py`: the module `mfac_glue.experiments.sweep`, also the console script `mfac-sweep`."""
import sys

from mfac_glue.experiments.sweep import main

sys.exit(main())
