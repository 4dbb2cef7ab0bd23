"""The browser viewer (``langfield view``): a viser app that renders a language field on the
server with langfield's rasterizer. Installed as ``langfield.viewer``.

:class:`ViewerApp` (the server), :func:`serve`, :func:`cli_view` (the CLI verb);
:mod:`.render` holds the viser-independent engine (frames for every mode, the per-client
render worker)."""

from .app import ClientSession, ViewerApp, cli_view, serve
from .render import MODES, CameraState, Frame, FrameRenderer, RenderWorker, Settings

__all__ = ["ViewerApp", "ClientSession", "serve", "cli_view", "MODES", "CameraState", "Frame", "FrameRenderer",
           "RenderWorker", "Settings"]
