"""`mixprec train` and `mixprec compare`: models, embedded data, the training loop and the experiments.

The core library never imports this package; it is the command-line tool and its building blocks.
"""
