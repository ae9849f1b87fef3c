"""Hand a bare top-level name that a checkout folder shadows back to the installed package of that name.

loraplex's folders are installed as ``loraplex.<name>`` and are never importable by their bare names; see
``loraplex.kernels.__init__``, the one that shares its name with a real distribution (Hugging Face's
``kernels``, imported by transformers).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(name: str, init_file: str) -> None:
    """Replace ``sys.modules[name]`` (this folder, found through the checkout root on ``sys.path``) with the
    module of that name found on the rest of ``sys.path``; ImportError naming the cause when there is none."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(init_file)))
    search = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, search)
    sys.modules.pop(f"{name}._bare_name", None)
    if spec is None or spec.loader is None:
        sys.modules.pop(name, None)
        raise ImportError(
            f"no module named {name!r} is installed; the folder {os.path.dirname(init_file)} is loraplex.{name} "
            f"and is not importable by its bare name (the checkout root is on sys.path)",
            name=name,
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
