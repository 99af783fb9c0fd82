"""A stop request (SIGTERM, SIGINT) that ``anovl fit`` honours at the next batch boundary, so that the checkpoint
it then saves holds a consistent state (never weights half-way through an optimiser step). Kept free of torch:
the console script imports it before it knows the subcommand."""

import threading

stop_requested = threading.Event()
