"""`python scripts/controls.py`: the module `mfac_optim.experiments.controls`, also the console script `mfac-controls`."""
import sys

from mfac_optim.experiments.controls import main

sys.exit(main())
