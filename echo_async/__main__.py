"""`python -m echo_async` is the `echo-async` command."""

from echo_async.cli import main

raise SystemExit(main())
