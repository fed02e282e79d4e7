"""`python scripts/compare.py`: the module `mfac_optim.experiments.compare`, also the console script `mfac-compare`."""
import sys

from mfac_optim.experiments.compare import main

sys.exit(main())
