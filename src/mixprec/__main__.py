"""`python -m mixprec`: the same command line as `mixprec`."""
from mixprec.train.cli import main

raise SystemExit(main())
