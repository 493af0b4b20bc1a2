"""Triton kernels and their host-side launchers.

* :mod:`.cells`: per-cell gate functions (the extension point);
* :mod:`.recurrent`: the persistent forward/backward kernel skeleton;
* :mod:`.launch`: configs, grids, persistent vs stepwise launches;
* :mod:`.config`: :class:`KernelConfig`;
* :mod:`.inspect`: the static compile report (no GPU needed).
"""

from .config import KernelConfig

__all__ = ["KernelConfig"]
