"""The figure primitives every PNG of the library is drawn with (training curves, report plots).

A figure is a fresh ``matplotlib.figure.Figure`` on the Agg canvas: nothing goes through
``matplotlib.pyplot``, so no global figure state is created or leaked between calls, and drawing
works on machines without a display. matplotlib is imported only when a figure is drawn; install
it with ``pip install 'fedjax_med[report]'``.
"""

from __future__ import annotations

import os
import types

import numpy as np

DPI = 150
INSTALL_HINT = "plots need matplotlib: pip install 'fedjax_med[report]'"


def load_matplotlib() -> types.SimpleNamespace:
    """matplotlib's ``figure``, ``patches`` and Agg backend (``ImportError``: install hint)."""
    try:
        from matplotlib import figure, patches
        from matplotlib.backends import backend_agg
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return types.SimpleNamespace(figure=figure, patches=patches, backend_agg=backend_agg)


def matplotlib_available() -> bool:
    """Whether figures can be drawn here (matplotlib is an optional extra)."""
    try:
        load_matplotlib()
    except ImportError:
        return False
    return True


def new_figure(mpl: types.SimpleNamespace, figsize: tuple[float, float]):
    """A constrained-layout figure of ``figsize`` inches on its own Agg canvas."""
    fig = mpl.figure.Figure(figsize=figsize, dpi=DPI, layout="constrained")
    mpl.backend_agg.FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | os.PathLike) -> str:
    """Writes ``fig`` to ``path`` as PNG (parent folders created); returns the path."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def show_image(ax, image: np.ndarray, low: float, high: float) -> None:
    """Draws one ``(H, W, C)`` image (grey for ``C = 1``) over ``[low, high]``, without ticks.

    NaN and inf (a diverged reconstruction) show as black or white instead of failing.
    """
    image = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=low, posinf=high, neginf=low)
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=low, vmax=high)
    else:
        ax.imshow(np.clip((image - low) / (high - low), 0.0, 1.0))
    ax.set_xticks([])
    ax.set_yticks([])
