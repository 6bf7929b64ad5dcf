"""Serving stage: a Ray Serve application over a sharded index, with an HTTP JSON API and a web page.

```python
from rayhash.serve import start_service
service = start_service("INDEX", port=8000, data="DS/train")   # returns when every replica is up
# POST service.url + "search" {"codes": ["0f3a..."], "k": 10}, POST .../search/image, GET .../item/KEY, ...
service.stop()
```

``rayhash serve --index INDEX`` runs the same until interrupted; ``serve run rayhash.serve:app index=INDEX`` with Ray
Serve's CLI. Request rules and limits: :mod:`rayhash.serve.api`. Imports nothing heavy until used.
"""
from __future__ import annotations

import importlib

_LAZY = {"start_service": "service", "Service": "service", "app": "service", "service_token": "service"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"rayhash.serve.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
