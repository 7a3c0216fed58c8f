"""The command-line tools. Installed as the package `deeplab_tools` (commands deeplab-export,
deeplab-segment, ...); from a checkout, run them as `python tools/<name>.py`."""
