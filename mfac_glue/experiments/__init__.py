"""The tools that compare optimizers on GLUE with run_glue.py, as modules (each also a console script and a thin
`scripts/` entry point):

- tune: an equal-budget search of one optimizer's hyperparameters (Optuna), with search_space (the JSON spaces),
  tune_trial (one trial in a process of its own) and tune_report (`--report`);
- sweep: run_glue.py configs over seeds; compare: runs grouped by setting, with the statistics that say whether
  two groups differ; controls: a task's dev score without training.

They need the `experiments` extra (Optuna, matplotlib). They parse run_glue.py's command line as the script does
(mfac_glue.arguments) and run the script as `python -m run_glue`, which the distribution installs beside the
packages, without importing it; `import mfac_optim` never imports them.
"""
