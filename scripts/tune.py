"""`python scripts/tune.py`: the module `mfac_glue.experiments.tune`, also the console script `mfac-tune`."""
import sys

from mfac_glue.experiments.tune import main

sys.exit(main())
