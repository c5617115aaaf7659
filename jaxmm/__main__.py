"""`python -m jaxmm ...` is the `jaxmm` command."""

from jaxmm.cli import main

raise SystemExit(main())
