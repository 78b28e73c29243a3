"""The ``twinview`` command: thin entry points that parse, call one library function and print."""
