"""`python scripts/sweep.py`: the module `mfac_optim.experiments.sweep`, also the console script `mfac-sweep`."""
import sys

from mfac_optim.experiments.sweep import main

sys.exit(main())
