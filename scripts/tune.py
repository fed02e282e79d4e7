"""`python scripts/tune.py`: the module `mfac_optim.experiments.tune`, also the console script `mfac-tune`."""
import sys

from mfac_optim.experiments.tune import main

sys.exit(main())
