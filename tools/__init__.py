"""The command-line tools, each thin: parse the arguments, call the library (evaluation/,
benchmarking/, export/, runtime/), print. Installed as the package `deeplab_tools` (commands
deeplab-export, deeplab-segment, ...); from a checkout, run them as `python -m tools.<name>`."""
