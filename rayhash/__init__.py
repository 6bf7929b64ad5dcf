"""rayhash: semantic binary hashing on Ray."""
__version__ = "0.1.0"
