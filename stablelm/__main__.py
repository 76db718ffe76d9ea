"""`python -m stablelm`: the `stablelm` command."""

from .cli import main

raise SystemExit(main())
