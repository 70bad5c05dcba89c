"""The condfx version, in a leaf module: the bundle writer and reader record and check it without
importing the public API (``condfx/__init__`` re-exports it as ``condfx.__version__``)."""

__version__ = "0.1.0"
