"""``langfield view RUN_OR_PLY``: a viser app that renders a language field in the browser.

The server renders every frame itself with langfield's rasterizer (CPU, or CUDA when present)
and sends it to the browser as the scene's background image; the browser only draws the GUI
and the dataset's cameras. Each connected client gets its own controls and its own render
thread (:class:`~langfield.viewer.render.RenderWorker`): the newest camera wins, the camera
renders at a lower resolution while it moves and at full resolution once it rests, and stale
renders are abandoned.

Modes: RGB, depth, PCA of the language features, relevancy heatmap over RGB for the typed
query, query mask. Controls: query, level (auto or one of the scene's), threshold, select in
3D (highlights the Gaussians matching the query), the dataset's cameras (click a frustum, or
pick one from the list), render resolution; frames per second and the Gaussian count are
shown. A plain 3DGS PLY (no language) opens for RGB viewing; a run that is still training is
polled every ``reload_every`` seconds for newer checkpoints, and a run that is still mapping
(``langfield slam``) also for its ``cameras.json`` (keyframe frustums appear and move as the
camera path grows and is refined: :meth:`ViewerApp.reload_state`). Dynamic runs (deformable
Gaussians) get a time slider and play/pause (at ``Play fps`` time steps per second over the
dataset's frame times); colour, queries and 3D selection follow the shown time, and the time is
shown next to the frame rate.

    from langfield.viewer import ViewerApp
    app = ViewerApp("runs/tabletop")          # or a LanguageField, or a .ply
    print(app.url); app.wait()
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Dict, List, Literal, Optional

import numpy as np
import tyro
from typing_extensions import Annotated

from .render import (MODE_LABELS, MODES, CameraState, Frame, FrameRenderer, Job, RenderWorker, Settings,
                     camera_target, fov_of, scene_extent, viser_pose_of)

__all__ = ["ViewerApp", "ClientSession", "serve", "cli_view"]

FREE_VIEW = "(free)"
PathArg = tyro.conf.Positional[Annotated[Path, tyro.conf.arg(metavar="RUN_OR_PLY")]]


def _label_to_mode(label: str) -> str:
    for k, v in MODE_LABELS.items():
        if v == label:
            return k
    return "rgb"


FRUSTUMS_SHOWN_UP_TO = 32  # more dataset cameras than this: frustums hidden until "Show cameras"


def frustum_scale(positions, radius: float) -> float:
    """Size of a camera frustum drawing: half the median distance between neighbouring cameras,
    at most 5 % of the scene radius (so that dozens of frustums never cover the scene)."""
    P = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    cap = 0.05 * float(radius)
    if P.shape[0] < 2:
        return cap
    d = np.linalg.norm(P[:, None, :] - P[None, :, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    nn = d.min(1)
    nn = nn[np.isfinite(nn) & (nn > 0)]
    return float(min(cap, 0.5 * np.median(nn))) if nn.size else cap


class ClientSession:
    """One connected browser: its controls, its render thread, its last frame."""

    def __init__(self, app: "ViewerApp", client):
        self.app = app
        self.client = client
        self.closed = False
        self.last_frame: Optional[Frame] = None
        self.last_job: Optional[Job] = None
        self.frames = 0
        self._message = None
        self._stats_t = 0.0
        self._updating = False
        field = app.field
        gui = client.gui
        self.stats = gui.add_markdown(self._stats_text(None))
        self.mode = gui.add_dropdown("Mode", [MODE_LABELS[m] for m in MODES], initial_value=MODE_LABELS["rgb"],
                                     hint="what to draw; the language modes need a scene with language")
        self.query = gui.add_text("Query", "", hint="text to look for, e.g. 'red mug' (Enter or click away)")
        self.level = gui.add_dropdown("Level", ["auto", *field.levels], initial_value="auto",
                                      hint="auto: the level with the strongest response")
        self.threshold = gui.add_slider("Threshold", 0.0, 1.0, 0.01, 0.4,
                                        hint="on the normalised relevancy (mask and 3D selection)")
        self.select = gui.add_checkbox("Select in 3D", False,
                                       hint="highlight the Gaussians whose relevancy to the query is above threshold")
        names = [FREE_VIEW] + [self.app.camera_label(i) for i in range(len(field.cameras))]
        self.view = gui.add_dropdown("Go to camera", names, initial_value=FREE_VIEW,
                                     hint="jump to one of the dataset's cameras (or click a frustum)",
                                     visible=len(names) > 1)
        self.show_cameras = gui.add_checkbox("Show cameras", bool(app.frustums_visible),
                                             hint="the dataset's camera frustums (off by default for many cameras)",
                                             visible=len(names) > 1)
        self.show_cameras.on_update(lambda _e: app.set_frustums_visible(bool(self.show_cameras.value)))
        self.resolution = gui.add_slider("Resolution", 64, max(2048, int(app.max_res)), 32, int(app.max_res),
                                         hint="longest side of a frame at rest, pixels")
        self.dynamic = FrameRenderer.is_dynamic(field.gaussians)
        times = sorted({float(c.time) for c in field.cameras if c.time is not None})
        self.time_step = (1.0 / max(len(times) - 1, 1)) if len(times) > 1 else 1.0 / 24
        self.time = gui.add_slider("Time", 0.0, 1.0, 0.001, 0.0, hint="the time shown (dynamic scenes)",
                                   visible=self.dynamic)
        self.play = gui.add_checkbox("Play", False, hint="advance the time, looping", visible=self.dynamic)
        self.play_fps = gui.add_slider("Play fps", 1, 30, 1, 8, hint="time steps per second while playing",
                                       visible=self.dynamic)
        self._player: Optional[threading.Thread] = None
        self.play.on_update(lambda _e: self._on_play())
        self.message = gui.add_markdown("")
        for h in (self.mode, self.query, self.level, self.threshold, self.select, self.resolution, self.time):
            h.on_update(self._on_control)
        self.view.on_update(self._on_view)
        self.worker = RenderWorker(self._render, self._deliver, on_error=self._on_error,
                                   rest_delay=app.rest_delay, motion_seconds=app.motion_seconds,
                                   name=f"langfield-render-{client.client_id}")
        self.worker.update_settings(self._settings())
        client.camera.on_update(self._on_camera)
        try:
            self._on_camera(client.camera)
        except AssertionError:  # no camera message yet: the first on_update brings it
            pass

    # -- controls -----------------------------------------------------------------------------
    def _settings(self) -> Settings:
        return Settings(mode=_label_to_mode(self.mode.value), query=str(self.query.value), level=str(self.level.value),
                        threshold=float(self.threshold.value), select=bool(self.select.value),
                        max_res=int(self.resolution.value), jpeg_quality=self.app.jpeg_quality,
                        time=float(self.time.value) if self.dynamic else None)

    def _on_play(self) -> None:
        if self.play.value and (self._player is None or not self._player.is_alive()):
            self._player = threading.Thread(target=self._play_loop, name="langfield-play", daemon=True)
            self._player.start()

    def _play_loop(self) -> None:
        """While Play is on: the next time step every 1 / fps seconds (looping at 1)."""
        while not self.closed and bool(self.play.value):
            nxt = float(self.time.value) + self.time_step
            self.set_settings(time=0.0 if nxt > 1.0 + 1e-9 else min(nxt, 1.0))
            time.sleep(1.0 / max(float(self.play_fps.value), 1.0))

    def _on_control(self, event=None) -> None:
        if self._updating:
            return
        s = self._settings()
        if event is not None and event.target is self.query and s.query.strip() and s.mode in ("rgb", "depth"):
            # typing a query means "show me where it is"
            self._updating = True
            try:
                self.mode.value = MODE_LABELS["relevancy"]
            finally:
                self._updating = False
            s = self._settings()
        self.worker.update_settings(s)

    def _on_camera(self, cam) -> None:
        st = CameraState.from_handle(cam)
        if st.width > 0 and st.height > 0:
            self.worker.update_camera(st)

    def _on_view(self, event=None) -> None:
        v = self.view.value
        if v == FREE_VIEW:
            return
        try:
            i = [self.app.camera_label(k) for k in range(len(self.app.field.cameras))].index(v)
        except ValueError:
            return
        self.app.goto_camera(self.client, i)
        self.view.value = FREE_VIEW  # a menu of jumps: the same camera can be picked again

    def set_settings(self, **changes) -> None:
        """Change controls from the server (tests, scripts): same effect as the GUI."""
        self._updating = True
        try:
            for k, v in changes.items():
                if k == "mode":
                    self.mode.value = MODE_LABELS[v]
                elif k == "query":
                    self.query.value = v
                elif k == "level":
                    self.level.value = v
                elif k == "threshold":
                    self.threshold.value = float(v)
                elif k == "select":
                    self.select.value = bool(v)
                elif k == "max_res":
                    self.resolution.value = int(v)
                elif k == "time":
                    self.time.value = min(max(float(v), 0.0), 1.0)
                elif k == "play":
                    self.play.value = bool(v)
                else:
                    raise KeyError(k)
        finally:
            self._updating = False
        self.worker.update_settings(self._settings())

    # -- frames -------------------------------------------------------------------------------
    def _render(self, job: Job, cancelled) -> Frame:
        return self.app.renderer.render(job.camera, job.settings, job.width, job.height, quality=job.quality,
                                        cancelled=cancelled)

    def _deliver(self, job: Job, frame: Frame) -> None:
        if self.closed:
            return
        q = job.settings.jpeg_quality if job.quality == "rest" else min(job.settings.jpeg_quality, 70)
        self.client.scene.set_background_image(frame.image, format="jpeg", jpeg_quality=int(q))
        self.last_frame, self.last_job = frame, job
        self.frames += 1
        self._show_message(frame.message)
        now = time.perf_counter()
        if now - self._stats_t > 0.5 or job.quality == "rest":
            self._stats_t = now
            self.stats.content = self._stats_text(frame)
        self.client.flush()

    def _on_error(self, job: Job, exc: BaseException) -> None:
        if self.closed:
            return
        msg = str(exc) or type(exc).__name__
        if not isinstance(exc, ValueError):
            import traceback

            traceback.print_exception(type(exc), exc, exc.__traceback__)
            msg = f"{type(exc).__name__}: {msg}"
        self._show_message(msg)

    def _show_message(self, msg: str) -> None:
        if msg == self._message:
            return
        self._message = msg
        self.message.content = f"⚠ {msg}" if msg else ""

    def _stats_text(self, frame: Optional[Frame]) -> str:
        f = self.app.field
        what = f"{f.num:,} Gaussians"
        if f.step is not None:
            what += f" · step {f.step:,}"
        if not f.has_language:
            what += " · RGB only"
        if frame is None:
            return f"**— fps** · {what}"
        fps = self.worker.fps.fps(frame.seconds)
        line = f"**{fps:.1f} fps** · {frame.width}×{frame.height} ({frame.quality}, {frame.seconds * 1e3:.0f} ms)"
        if self.dynamic and frame.time is not None:
            line += f" · **t = {frame.time:.3f}**" + (" ▶" if bool(self.play.value) else "")
        extra = []
        if frame.path:
            extra.append(f"{frame.path} relevancy")
        if frame.level:
            extra.append(f"level {frame.level}")
        if frame.selected is not None:
            extra.append(f"{frame.selected:,} selected")
        return f"{line}  \n{what}" + (f"  \n{' · '.join(extra)}" if extra else "")

    def on_reload(self) -> None:
        f = self.app.field
        opts = ("auto", *f.levels)
        if tuple(self.level.options) != opts:
            if self.level.value not in opts:
                self._updating = True
                try:
                    self.level.value = "auto"
                finally:
                    self._updating = False
            self.level.options = opts
        names = (FREE_VIEW, *[self.app.camera_label(i) for i in range(len(f.cameras))])
        if tuple(self.view.options) != names:
            self.view.options = names
            self.view.visible = self.show_cameras.visible = len(names) > 1
        self.stats.content = self._stats_text(self.last_frame)
        self.worker.invalidate()

    def close(self) -> None:
        self.closed = True
        if hasattr(self, "play"):
            try:
                self.play.value = False
            except Exception:  # the client is gone
                pass
        self.worker.stop(join=False)


class ViewerApp:
    """The viewer server. ``field``: a :class:`~langfield.field.LanguageField`, or a path to a
    run folder or a .ply (loaded with ``device``). Binds ``host`` (127.0.0.1: this machine
    only; 0.0.0.0 to share it on the network) and ``port`` (0: any free port).

    ``max_res``: the initial longest side of a frame at rest (default 640 on CPU, 1280 on
    CUDA); ``exact_budget``: see :class:`~langfield.viewer.render.FrameRenderer`;
    ``reload_every``: seconds between checks for a newer checkpoint (runs only; 0: never)."""

    def __init__(self, field, host: str = "127.0.0.1", port: int = 8080, *, device: str = "auto",
                 max_res: Optional[int] = None, exact_budget: Optional[int] = None, reload_every: float = 2.0,
                 rest_delay: float = 0.2, motion_seconds: float = 1 / 15, jpeg_quality: int = 85,
                 frustums: bool = True, max_frustums: int = 300, verbose: bool = True, label: str = "langfield"):
        from langfield.field import LanguageField

        if not isinstance(field, LanguageField):
            field = LanguageField.load(field, device=device)
        self.field = field
        self.renderer = FrameRenderer(field, exact_budget=exact_budget)
        self.max_res = int(max_res or (1280 if field.device.type == "cuda" else 640))
        self.rest_delay = float(rest_delay)
        self.motion_seconds = float(motion_seconds)
        self.jpeg_quality = int(jpeg_quality)
        self.verbose = verbose
        self.sessions: Dict[int, ClientSession] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

        import viser

        self.server = viser.ViserServer(host=host, port=int(port), label=label, verbose=verbose)
        self._frustums: List = []
        self._setup_scene(frustums, max_frustums)
        self._cams_stamp = self._cameras_stamp()
        self.server.on_client_connect(self._on_connect)
        self.server.on_client_disconnect(self._on_disconnect)
        self._reloader = None
        if field.kind == "run" and reload_every and reload_every > 0:
            self._reloader = threading.Thread(target=self._reload_loop, args=(float(reload_every),),
                                              name="langfield-reload", daemon=True)
            self._reloader.start()

    # -- facts --------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return self.server.get_host()

    @property
    def port(self) -> int:
        return self.server.get_port()

    @property
    def url(self) -> str:
        h = self.host
        return f"http://{'localhost' if h in ('0.0.0.0', '::') else h}:{self.port}"

    def camera_label(self, i: int) -> str:
        c = self.field.cameras[i]
        return f"{i}: {c.name} ({c.split})"

    # -- scene --------------------------------------------------------------------------------
    def _setup_scene(self, frustums: bool, max_frustums: int) -> None:
        f = self.field
        center, radius = scene_extent(f.gaussians.means)
        self.center, self.radius = center, radius
        cams = f.cameras
        if cams:
            ups = [-np.linalg.inv(np.asarray(c.viewmat, dtype=np.float64))[:3, 1] for c in cams]
            up = np.mean(ups, axis=0)
            up = up / np.linalg.norm(up) if np.linalg.norm(up) > 1e-6 else ups[0]
        else:
            up = np.array([0.0, -1.0, 0.0])  # OpenCV / COLMAP worlds
        self.up = up
        self.server.scene.set_up_direction(tuple(float(v) for v in up))
        ic = self.server.initial_camera
        if cams:
            first = next((c for c in cams if c.split == "train"), cams[0])
            wxyz, pos = viser_pose_of(first.viewmat)
            R = np.linalg.inv(np.asarray(first.viewmat, dtype=np.float64))[:3, :3]
            fwd = R[:, 2]
            d = float(np.dot(center - pos, fwd))
            ic.fov = fov_of(first.K, first.height)
            ic.position = tuple(float(v) for v in pos)
            ic.look_at = tuple(float(v) for v in pos + fwd * (d if d > 1e-3 else radius))
            ic.up = tuple(float(v) for v in -R[:, 1])
        else:
            pos = center + np.array([0.0, 0.0, -2.5 * radius])
            ic.position = tuple(float(v) for v in pos)
            ic.look_at = tuple(float(v) for v in center)
            ic.up = tuple(float(v) for v in up)
        self.frustums_visible = len(cams) <= FRUSTUMS_SHOWN_UP_TO
        self._frustums_on = bool(frustums)
        self._max_frustums = int(max_frustums)
        self._frustum_size = frustum_scale([viser_pose_of(c.viewmat)[1] for c in cams], radius) if cams else 0.0
        self._frustum_ids: List[int] = []  # the camera index each frustum shows
        if frustums and cams:
            step = max(1, int(np.ceil(len(cams) / max(1, max_frustums))))
            for i in range(0, len(cams), step):
                self._add_frustum(i, cams[i])

    def _add_frustum(self, i: int, c) -> None:
        wxyz, pos = viser_pose_of(c.viewmat)
        kw = dict(fov=fov_of(c.K, c.height), aspect=c.width / max(c.height, 1), scale=self._frustum_size,
                  visible=self.frustums_visible,
                  wxyz=wxyz, position=pos, color=(60, 120, 220) if c.split == "train" else (230, 140, 40))
        try:  # thin lines in screen pixels: a frustum seen from its own apex must not fill the view
            h = self.server.scene.add_camera_frustum(f"/cameras/{i:05d}", thickness=1.5,
                                                     thickness_units="screen", **kw)
        except TypeError:  # viser before `thickness`
            h = self.server.scene.add_camera_frustum(f"/cameras/{i:05d}", line_width=1.5, **kw)
        h.on_click(self._frustum_clicked(i))
        self._frustums.append(h)
        self._frustum_ids.append(i)

    def _cameras_file(self) -> Optional[Path]:
        f = self.field
        if f.kind != "run" or f.source is None:
            return None
        p = Path(f.source) / "cameras.json"
        return p if p.is_file() else None

    def _cameras_stamp(self):
        p = self._cameras_file()
        if p is None:
            return None
        try:
            st = p.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def reload_cameras(self) -> bool:
        """For a run that carries its own cameras (``RUN/cameras.json``, written by ``langfield
        slam`` as it maps): read them again if the file changed, move the frustums of cameras
        whose pose changed (keyframe poses are refined while mapping) and add frustums for new
        ones. Returns True when the cameras changed."""
        stamp = self._cameras_stamp()
        if stamp is None or stamp == self._cams_stamp:
            return False
        from langfield.field import read_cameras_json

        try:
            cams = read_cameras_json(self._cameras_file())
        except Exception:  # noqa: BLE001 - a file being replaced: try again next time
            return False
        self._cams_stamp = stamp
        old = self.field.cameras
        changed = len(cams) != len(old) or any(
            not np.allclose(np.asarray(a.viewmat), np.asarray(b.viewmat)) for a, b in zip(cams, old))
        if not changed:
            return False
        self.field.cameras = list(cams)
        if self._frustums_on and cams:
            if not self._frustum_size:
                self._frustum_size = frustum_scale([viser_pose_of(c.viewmat)[1] for c in cams], self.radius)
            for h, i in zip(self._frustums, self._frustum_ids):
                if i < len(cams):
                    wxyz, pos = viser_pose_of(cams[i].viewmat)
                    h.wxyz, h.position = wxyz, pos
            nxt = (self._frustum_ids[-1] + 1) if self._frustum_ids else 0
            for i in range(nxt, len(cams)):
                if len(self._frustums) >= self._max_frustums:
                    break
                self._add_frustum(i, cams[i])
        return True

    def reload_state(self) -> Dict[str, bool]:
        """One poll of a run that is still being written: a newer checkpoint (the map growing)
        and, for runs with their own cameras, ``cameras.json`` (the camera path). Clients are
        re-rendered when anything changed. Returns ``{"map": ..., "cameras": ...}``."""
        fresh = bool(self.field.reload())
        cams = self.reload_cameras()
        if fresh or cams:
            self.notify_reload()
        return {"map": fresh, "cameras": cams}

    def set_frustums_visible(self, visible: bool) -> None:
        self.frustums_visible = bool(visible)
        for h in self._frustums:
            h.visible = self.frustums_visible

    def _frustum_clicked(self, i: int):
        def cb(event) -> None:
            self.goto_camera(event.client, i)
        return cb

    def goto_camera(self, client, i: int) -> None:
        """Move ``client``'s camera to dataset camera ``i`` (pose and vertical field of view)."""
        c = self.field.cameras[i]
        fov, pos, look_at, up = camera_target(c.viewmat, c.K, c.height, self.center, self.radius)
        with client.atomic():
            client.camera.fov = fov
            client.camera.position = pos
            client.camera.look_at = look_at
            client.camera.up_direction = up
        client.flush()
        sess = self.sessions.get(client.client_id)
        if sess is not None and sess.dynamic and c.time is not None:  # the camera's own moment
            sess.set_settings(time=float(c.time))

    # -- clients ------------------------------------------------------------------------------
    def _on_connect(self, client) -> None:
        s = ClientSession(self, client)
        with self._lock:
            self.sessions[client.client_id] = s
        if self.verbose:
            print(f"langfield view: client {client.client_id} connected ({len(self.sessions)} now)", flush=True)

    def _on_disconnect(self, client) -> None:
        with self._lock:
            s = self.sessions.pop(client.client_id, None)
        if s is not None:
            s.close()

    def wait_for_clients(self, n: int = 1, timeout: float = 30.0) -> List[ClientSession]:
        end = time.perf_counter() + timeout
        while time.perf_counter() < end:
            with self._lock:
                if len(self.sessions) >= n:
                    return list(self.sessions.values())
            time.sleep(0.02)
        raise TimeoutError(f"{len(self.sessions)} of {n} clients connected within {timeout} s")

    # -- running runs -------------------------------------------------------------------------
    def _reload_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.reload_state()
            except Exception as e:  # noqa: BLE001 - keep serving the scene we have
                if self.verbose:
                    print(f"langfield view: reload failed: {e}", flush=True)

    def notify_reload(self) -> None:
        """The field changed (a newer checkpoint): re-render every client."""
        if self.verbose:
            print(f"langfield view: loaded step {self.field.step} ({self.field.num:,} Gaussians, "
                  f"{self.field.stage}, {len(self.field.cameras)} cameras)", flush=True)
        self.renderer.clear()
        with self._lock:
            sessions = list(self.sessions.values())
        for s in sessions:
            s.on_reload()

    # -- life ---------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            sessions = list(self.sessions.values())
            self.sessions.clear()
        for s in sessions:
            s.close()
        self.server.stop()

    def wait(self) -> None:
        """Serve until Ctrl+C."""
        try:
            while not self._stop.wait(3600):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> "ViewerApp":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(field, host: str = "127.0.0.1", port: int = 8080, **kw) -> None:
    """Start a :class:`ViewerApp` and serve until Ctrl+C."""
    app = ViewerApp(field, host=host, port=port, **kw)
    print(f"langfield view: {app.url}  (Ctrl+C to stop)", flush=True)
    app.wait()


def cli_view(
    path: PathArg,
    host: str = "127.0.0.1",
    port: int = 8080,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    max_res: Optional[int] = None,
    exact_budget: Optional[int] = None,
    reload_every: float = 2.0,
) -> int:
    """Look at a run or a 3DGS PLY in the browser: RGB, depth, language PCA, query heatmaps and masks.

    Args:
        path: a run folder (a run still training is followed: newer checkpoints are picked up) or a .ply.
        host: address to bind; 127.0.0.1 serves this machine only, 0.0.0.0 shares it on the network.
        port: port to bind (0: any free port).
        device: auto, cpu or cuda.
        max_res: longest side of a frame at rest, pixels (default 640 on CPU, 1280 on CUDA).
        exact_budget: decoded pixels per exact relevancy frame at rest (0: always the fast per-Gaussian relevancy).
        reload_every: seconds between checks for a newer checkpoint of a run (0: never).
    """
    from langfield.field import FieldError

    try:
        app = ViewerApp(Path(path), host=host, port=port, device=device, max_res=max_res, exact_budget=exact_budget,
                        reload_every=reload_every)
    except (FieldError, FileNotFoundError) as e:
        from langfield.errors import fail

        raise fail(str(e)) from None
    f = app.field
    what = f"{f.num:,} Gaussians, {'language levels ' + ', '.join(f.levels) if f.has_language else 'RGB only'}"
    print(f"langfield view: {f.source} ({what}) on {f.device}\n  open {app.url}  (Ctrl+C to stop)", flush=True)
    app.wait()
    return 0
