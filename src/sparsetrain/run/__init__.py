"""The application: run options and the recipe, the training loop, the run folder, the command
line, the comparison grid, plots and export. Nothing below this package imports it."""

from .folder import LoadedRun, RunFolder, load_run
from .loop import Setup, evaluate, fit, prepare, train
from .options import TrainOptions, options_from_dict

__all__ = ["LoadedRun", "RunFolder", "Setup", "TrainOptions", "evaluate", "fit", "load_run", "options_from_dict",
           "prepare", "train"]
