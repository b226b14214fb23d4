"""`python -m mixprec`: the same command line as `mixprec`."""
from mixprec.cli import main

raise SystemExit(main())
