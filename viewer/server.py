"""The live browser viewer: a viser server that shows `Snapshot`s while a run trains, or a finished result.

Threads. The training loop calls `update` (scalars, cheap) every step and `publish` (a new frozen
`Snapshot`) every `refresh_every` steps; neither waits for the network or for a render. 3D Gaussians
go to the browser as viser's native splat node, which the client renders itself. Everything else
(fields, and the depth / alpha / normal modes of Gaussians) is rendered by the viewer's own thread
from the snapshot's frozen copy, for each client's camera, at a resolution that drops to a quarter
while the camera moves, and with sleeps that keep its share of the CPU near `render_share`.
The only controls that reach the training thread are flags it polls between steps: pause and
"export now"; a disconnecting client costs nothing.

Clients. Anything that can open the websocket can send viser messages, not only the page this server serves, so
the viewer checks what reaches it (`_guard_client_messages`): values are checked per control before they are stored,
the read-only readouts take nothing, uploads and share requests are refused, and a client's camera is checked for
finite numbers and clamped before a server render (`client_camera`).

Time. A snapshot with a `Timeline` (a 4D result) adds a "Time" slider and a Play / Pause button in an
"Animation" folder; a snapshot without one removes them, so static results look exactly as before. The
slider snaps to the timeline's frames: moving it replaces the splat node with the nearest frame's splats
(precomputed in the snapshot, so a move is one message), and the server-side modes render that frame's
time. Play runs a small "gen3d-viewer-play" thread that advances the slider one frame per 1 / fps seconds
and loops; it polls a flag while paused and ends in `close()`.
"""

from __future__ import annotations

import contextlib
import io
import math
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from gen3d.viewer.protocol import Snapshot

if TYPE_CHECKING:
    from gen3d.cameras import Cameras

MODES = ("rgb", "depth", "alpha", "normal")
RESOLUTIONS = (64, 1024)
"""The Resolution slider's range; a client's value outside it (or not a number) is clamped back into it."""
ASPECTS = (0.2, 5.0)
"""Width / height of server renders is kept in this range whatever a client's camera claims (bounds the image size)."""


def free_port(host: str, port: int, tries: int = 20) -> int:
    """`port` if it can be bound on `host`, else the next free one of the following `tries - 1`."""
    for candidate in range(port, port + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, candidate))
            except OSError:
                continue
            return candidate
    raise OSError(f"no free port in {port}..{port + tries - 1} on {host}; pass viewer.port=<another port>")


def matrix_quaternion(R: np.ndarray) -> np.ndarray:
    """A unit quaternion (w, x, y, z) of the rotation matrix R [3, 3]."""
    w = math.sqrt(max(0.0, 1.0 + R[0, 0] + R[1, 1] + R[2, 2])) / 2
    x = math.sqrt(max(0.0, 1.0 + R[0, 0] - R[1, 1] - R[2, 2])) / 2
    y = math.sqrt(max(0.0, 1.0 - R[0, 0] + R[1, 1] - R[2, 2])) / 2
    z = math.sqrt(max(0.0, 1.0 - R[0, 0] - R[1, 1] + R[2, 2])) / 2
    x, y, z = math.copysign(x, R[2, 1] - R[1, 2]), math.copysign(y, R[0, 2] - R[2, 0]), math.copysign(z, R[1, 0] - R[0, 1])
    return np.array([w, x, y, z])


def finite_number(value, default: float, lo: float, hi: float) -> float:
    """`value` clamped to [lo, hi] when it is a finite real number (not a bool), else `default`: every number a client
    sends (control values, its camera) goes through this before the viewer uses it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return min(max(float(value), lo), hi)


def clamped(lo: float, hi: float, integer: bool = False) -> Callable[[object], float | None]:
    """The check of a client's value for a slider over [lo, hi]: a finite number, clamped into it; else None."""
    def check(value) -> float | None:
        v = finite_number(value, math.nan, lo, hi)
        return None if math.isnan(v) else int(round(v)) if integer else v
    return check


def client_camera(cam, height: int) -> "Cameras | None":
    """The gen3d camera of a viser client camera, or None when the client sent non-finite numbers; its field of view
    and aspect are clamped so that no client can ask for a degenerate or huge render."""
    wxyz, position = np.asarray(cam.wxyz, dtype=np.float64), np.asarray(cam.position, dtype=np.float64)
    if wxyz.shape != (4,) or position.shape != (3,) or not (np.isfinite(wxyz).all() and np.isfinite(position).all()):
        return None
    if np.linalg.norm(wxyz) < 1e-6 or np.abs(position).max() > 1e6:
        return None
    fov = finite_number(cam.fov, math.radians(50), math.radians(1), math.radians(170))
    aspect = finite_number(cam.aspect, 1.0, *ASPECTS)
    return viser_camera(wxyz / np.linalg.norm(wxyz), position, fov, aspect, height)


def viser_camera(wxyz, position, fov: float, aspect: float, height: int) -> "Cameras":
    """gen3d `Cameras` (one camera) for a viser client camera: both use OpenCV axes (x right, y down, z forward);
    `fov` is the vertical field of view in radians, `aspect` width / height."""
    from gen3d.cameras import Cameras, intrinsics
    from gen3d.ops._projection import quat_to_rotmat

    c2w = torch.eye(4)
    c2w[:3, :3] = quat_to_rotmat(torch.tensor([float(v) for v in wxyz])[None])[0]
    c2w[:3, 3] = torch.tensor([float(v) for v in position])
    width = max(8, int(round(height * aspect)))
    eye = c2w[:3, 3]
    distance = float(eye.norm())
    azimuth = math.degrees(math.atan2(float(eye[1]), float(eye[0])))
    elevation = math.degrees(math.asin(max(-1.0, min(1.0, float(eye[2]) / max(distance, 1e-8)))))
    return Cameras(c2w[None], intrinsics(torch.tensor([math.degrees(fov)]), width, height), width, height,
                   torch.tensor([azimuth]), torch.tensor([elevation]), torch.tensor([distance]))


def mode_image(out, mode: str) -> np.ndarray:
    """The uint8 image [H, W, 3] of render mode `mode` from a one-camera RenderOutput."""
    if mode == "alpha":
        img = out.alpha[0].expand(-1, -1, 3)
    elif mode == "depth":
        depth, alpha = out.depth[0, ..., 0], out.alpha[0, ..., 0]
        valid = depth[alpha > 0.5]
        lo, hi = (float(valid.min()), float(valid.max())) if valid.numel() else (0.0, 1.0)
        near = 1.0 - (depth - lo) / max(hi - lo, 1e-6)  # near = bright
        img = (near.clamp(0, 1) * alpha)[..., None].expand(-1, -1, 3)
    elif mode == "normal" and out.normal is not None:
        img = (out.normal[0] * 0.5 + 0.5) * out.alpha[0] + (1 - out.alpha[0])
    else:
        img = out.rgb[0]
    return (img.detach().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)


class Viewer:
    """A viser server for one run or one result; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, title: str = "gen3d", description: str = "",
                 max_steps: int | None = None, resolution: int = 256, render_share: float = 0.15,
                 log: Callable[[str], None] = print, exports: bool = True) -> None:
        import viser

        self.log = log
        self.port = free_port(host, port)
        if self.port != port:
            log(f"viewer: port {port} is in use; using {self.port}")
        if host not in ("127.0.0.1", "localhost", "::1"):
            log(f"viewer: listening on {host}: anyone who can reach this machine on port {self.port} can watch "
                f"and pause the run (use viewer.host=127.0.0.1 to keep it local)")
        with contextlib.redirect_stdout(io.StringIO()):  # viser prints a banner to stdout; we print the URL ourselves
            self.server = viser.ViserServer(host=host, port=self.port, label=title, verbose=False)
        # no "share" button: it would tunnel this server to the internet at a click in any browser
        self.server.gui.configure_theme(show_share_button=False, control_width="medium")
        self._guard_client_messages()
        self.server.scene.set_up_direction("+z")  # gen3d's world: +z up, the front faces +x
        self.server.initial_camera.position = (2.2, 0.9, 0.9)
        self.server.initial_camera.look_at = (0.0, 0.0, 0.0)
        shown = "localhost" if host in ("127.0.0.1", "0.0.0.0") else f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}"
        self.render_share = render_share
        self._default_resolution = resolution
        self.training = False  # set by the training loop while it runs: server renders then take half the resolution
        self._snapshot: Snapshot | None = None
        self._snapshot_id = 0
        self._splats_id = -1
        self.time_folder = self.time_slider = self.play_button = None  # the time controls, while a timeline is shown
        self._frame_shown: tuple[int, int] | None = None  # (snapshot id, frame index) of the splats on show
        self._splats_lock = threading.Lock()  # the slider's callback and the play thread both replace the splats
        self._playing = threading.Event()
        self._play_thread: threading.Thread | None = None
        self._paused = threading.Event()
        self._export = threading.Event()
        self._stop = threading.Event()
        self._last: dict[int, tuple] = {}  # client id -> key of its last server render
        self._history: deque[tuple[int, float]] = deque(maxlen=2000)  # (step, loss) for the plot
        self._t_last, self._step_last = time.perf_counter(), 0
        self._build_gui(title, description, max_steps, resolution, exports)
        self._thread = threading.Thread(target=self._render_loop, name="gen3d-viewer", daemon=True)
        self._thread.start()

    # ---- GUI ------------------------------------------------------------------------------------
    def _build_gui(self, title: str, description: str, max_steps: int | None, resolution: int, exports: bool) -> None:
        gui = self.server.gui
        gui.add_markdown(f"**{title}**" + (f"  \n{description}" if description else ""))
        self.info = gui.add_markdown("")
        self.step_text = gui.add_text("Step", "0" + (f" / {max_steps}" if max_steps else ""), disabled=True)
        self.rate_text = gui.add_text("it/s", "-", disabled=True)
        self.loss_text = gui.add_text("Loss", "-", disabled=True)
        for handle in (self.step_text, self.rate_text, self.loss_text):  # read-only readouts
            self._accepts[handle._impl.uuid] = lambda value: None
        self.pause_button = gui.add_button("Pause")
        self.pause_button.on_click(lambda _: self.toggle_pause())
        self.mode = gui.add_dropdown("Render mode", MODES, initial_value="rgb")
        self.mode.on_update(lambda _: self._show_splats(self.render_mode == "rgb"))
        self.resolution = gui.add_slider("Resolution", *RESOLUTIONS, 32, resolution)
        self.show_cameras = gui.add_checkbox("Training cameras", True)
        self.show_cameras.on_update(lambda _: self._set_frustums_visible(self.cameras_shown))
        self._accepts[self.mode._impl.uuid] = lambda value: value if isinstance(value, str) and value in MODES else None
        self._accepts[self.resolution._impl.uuid] = clamped(*RESOLUTIONS, integer=True)
        self._accepts[self.show_cameras._impl.uuid] = lambda value: value if isinstance(value, bool) else None
        if exports:
            self.export_button = gui.add_button("Export now")
            self.export_button.on_click(lambda _: self._export.set())
        self.plot = None
        self.max_steps = max_steps
        self._frustums: list = []

    # ---- what clients may send ----------------------------------------------------------------------
    # viser applies a client's GUI message to the control as it comes (any type, any number, a file upload to any
    # input), so the viewer reads every control through one of these properties, which fall back to a sane value.
    @property
    def render_mode(self) -> str:
        """The Render mode control's value when it is one of `MODES`, else "rgb"."""
        value = self.mode.value
        return value if isinstance(value, str) and value in MODES else "rgb"

    @property
    def render_height(self) -> int:
        """The Resolution control's value, a whole number of pixels in `RESOLUTIONS` (else the nearest in range)."""
        return int(finite_number(self.resolution.value, self._default_resolution, *RESOLUTIONS))

    @property
    def cameras_shown(self) -> bool:
        value = self.show_cameras.value
        return value if isinstance(value, bool) else True

    def _slider_time(self) -> float:
        """The Time slider's value in [0, 1] (0 for anything that is not a finite number)."""
        return finite_number(self.time_slider.value, 0.0, 0.0, 1.0) if self.time_slider is not None else 0.0

    def _guard_client_messages(self) -> None:
        """Refuse what a browser (or any program speaking viser's protocol) could otherwise make this server do.

        viser hides the share button but still honours a client's share request, which would tunnel this server to
        share.viser.studio for anyone on the internet: refused. viser applies every property in a client's GUI
        update to the control (it would let a client replace a button's callbacks, or edit the read-only readouts),
        and any value: only `value` updates pass, and a control listed in `self._accepts` takes the value its check
        returns (a mode among MODES, a number clamped into the slider's range) or, for None, none. The check runs
        in the order the messages came, before viser stores the value, so every browser sees what the viewer
        uses. And viser accepts a file upload aimed at any control (its content then becomes the control's value);
        the viewer has no upload button, so uploads are dropped. No control takes a file name or a path: "Export now"
        only raises a flag, and the training loop writes the run's exports into its own `export/` folder.
        """
        from viser import _messages

        self.server.request_share_url = self._refuse_share
        ws = self.server._websock_server
        handle_updates = self.server.gui._handle_gui_updates
        ws.unregister_handler(_messages.GuiUpdateMessage, handle_updates)
        self._accepts: dict[str, Callable[[object], object]] = {}  # control uuid -> its check of a client's value

        async def value_updates_only(client_id, message) -> None:
            if set(message.updates) != {"value"}:
                return
            check = self._accepts.get(message.uuid)
            if check is not None:
                value = check(message.updates["value"])
                if value is None:
                    return
                message.updates["value"] = value
            try:
                await handle_updates(client_id, message)
            except (TypeError, ValueError, OverflowError):  # viser could not cast it to the control's type: dropped
                pass

        ws.register_handler(_messages.GuiUpdateMessage, value_updates_only)
        for upload in (_messages.FileTransferStartUpload, _messages.FileTransferPart):
            ws.unregister_handler(upload)

    def _refuse_share(self, *args, **kwargs) -> None:
        self.log("viewer: a client asked for a public share URL; refused (the viewer stays on this machine's network)")
        return None

    def toggle_pause(self) -> None:
        if self._paused.is_set():
            self._paused.clear()
            self.pause_button.label = "Pause"
        else:
            self._paused.set()
            self.pause_button.label = "Resume"

    def _show_splats(self, visible: bool) -> None:
        """Splats in rgb mode (the browser renders them); hidden under the server's depth / alpha / normal images."""
        splats = getattr(self, "splats", None)
        if splats is not None:
            try:
                splats.visible = visible
            except RuntimeError:  # replaced by a newer snapshot meanwhile, which took the mode into account
                pass

    def _set_frustums_visible(self, visible: bool) -> None:
        for f in self._frustums:
            f.visible = visible

    # ---- the training thread's side ---------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def wait_while_paused(self, stop: Callable[[], bool] = lambda: False, forever: bool = False,
                          timeout: float | None = None) -> bool:
        """Block the caller (the training loop) while the user has paused (with `forever`: until `stop()`), at most
        `timeout` seconds; returns whether it still is paused (so the caller can serve "Export now" and wait again)."""
        t_end = None if timeout is None else time.perf_counter() + timeout
        while (forever or self._paused.is_set()) and not self._stop.is_set() and not stop():
            if t_end is not None and time.perf_counter() > t_end:
                return True
            time.sleep(0.05)
        return False

    def pop_export_request(self) -> bool:
        """True once after the user pressed "Export now"."""
        if self._export.is_set():
            self._export.clear()
            return True
        return False

    def update(self, step: int, scalars: dict[str, float], cameras: "Cameras | None" = None,
               plot: bool = False) -> None:
        """Record one training step's scalars (cheap); with `plot`, also redraw the loss plot and the frustums."""
        now = time.perf_counter()
        if "loss" in scalars:
            self._history.append((step, float(scalars["loss"])))
        if now - self._t_last > 0.5:  # readouts at 2 Hz: each is a message and a panel redraw in every browser
            self.rate_text.value = f"{(step - self._step_last) / (now - self._t_last):.2f}"
            self._t_last, self._step_last = now, step
            self.step_text.value = f"{step}" + (f" / {self.max_steps}" if self.max_steps else "")
            if "loss" in scalars:
                self.loss_text.value = f"{scalars['loss']:.4g}"
        if plot:
            self._draw_plot()
            if cameras is not None:
                self._draw_frustums(cameras)

    def publish(self, snapshot: Snapshot) -> None:
        """Show a new snapshot: splats go to the browsers now, server renders follow on the viewer's thread."""
        if snapshot.timeline is not None:
            self._ensure_time_controls(snapshot.timeline)
        elif self.time_slider is not None:
            self._remove_time_controls()
        self._snapshot = snapshot
        self._snapshot_id += 1
        if snapshot.info:
            self.info.content = "  \n".join(f"{k}: {v}" for k, v in snapshot.info.items())
        if snapshot.timeline is not None:
            self._show_frame()
        elif snapshot.splats is not None:
            self._set_splats(snapshot.splats)
        if snapshot.mesh is not None:
            self.server.scene.add_mesh_trimesh("/result/mesh", snapshot.mesh)

    def _set_splats(self, s) -> None:
        """Replace the splat node by `s` (a `Splats`), visible in rgb mode only."""
        self.splats = self.server.scene.add_gaussian_splats(
            "/result/splats", centers=s.centers, covariances=s.covariances, rgbs=s.rgbs, opacities=s.opacities,
            visible=self.render_mode == "rgb")

    # ---- time (snapshots with a timeline) ----------------------------------------------------------
    @property
    def shown_time(self) -> float | None:
        """The shown time: the time of the timeline's frame nearest the slider; None without a timeline."""
        snap = self._snapshot
        if snap is None or snap.timeline is None or self.time_slider is None:
            return None
        return snap.timeline.times[snap.timeline.index_at(self._slider_time())]

    def _ensure_time_controls(self, timeline) -> None:
        """Add the Animation folder (Time slider, Play button) for `timeline`, or keep the current one, and its time,
        when it already has as many frames (a live 4D run publishing again)."""
        F = len(timeline)
        step = 1.0 / (F - 1) if F > 1 else 1.0
        if self.time_slider is not None and abs(self.time_slider.step - step) < 1e-9:
            return
        t = self._slider_time()
        if self.time_slider is not None:
            self._remove_time_controls()
        gui = self.server.gui
        with gui.add_folder("Animation", order=self.info.order + 0.5) as self.time_folder:
            self.time_slider = gui.add_slider("Time", 0.0, 1.0, step, min(max(t, 0.0), 1.0),
                                              hint="time of the 4D result; the view shows the nearest frame")
            self.play_button = gui.add_button("Play", icon="player-play")
        self._accepts[self.time_slider._impl.uuid] = clamped(0.0, 1.0)
        self.time_slider.on_update(lambda _: self._show_frame())
        self.play_button.on_click(lambda _: self.toggle_play())

    def _remove_time_controls(self) -> None:
        self._playing.clear()
        self._accepts.pop(self.time_slider._impl.uuid, None)
        self.time_folder.remove()
        self.time_folder = self.time_slider = self.play_button = None
        self._frame_shown = None

    def _show_frame(self) -> None:
        """Put the frame nearest the slider's time on the splat node, unless it is already there."""
        with self._splats_lock:
            snap, snap_id, slider = self._snapshot, self._snapshot_id, self.time_slider
            if snap is None or snap.timeline is None or slider is None:
                return
            index = snap.timeline.index_at(self._slider_time())
            if self._frame_shown != (snap_id, index):
                self._set_splats(snap.timeline.splats[index])
                self._frame_shown = (snap_id, index)

    def set_time(self, t: float) -> None:
        """Move the time slider to `t` (clamped to [0, 1]), as a user would; the view follows."""
        if self.time_slider is not None:
            self.time_slider.value = min(max(float(t), 0.0), 1.0)

    @property
    def playing(self) -> bool:
        return self._playing.is_set()

    def toggle_play(self) -> None:
        """Play (advance the time slider at the timeline's fps, looping) or pause; the button's label says which."""
        if self.play_button is None:
            return
        if self._playing.is_set():
            self._playing.clear()
            self.play_button.label, self.play_button.icon = "Play", "player-play"
            return
        self._playing.set()
        self.play_button.label, self.play_button.icon = "Pause", "player-pause"
        if self._play_thread is None:
            self._play_thread = threading.Thread(target=self._play_loop, name="gen3d-viewer-play", daemon=True)
            self._play_thread.start()

    def _play_loop(self) -> None:
        """While playing: one frame forward every 1 / fps seconds, back to the first after the last."""
        while not self._stop.is_set():
            snap = self._snapshot
            if snap is None or snap.timeline is None:
                self._stop.wait(0.1)
                continue
            if not self._playing.wait(0.1) or self._stop.wait(1.0 / snap.timeline.fps):
                continue
            slider = self.time_slider
            if self._playing.is_set() and slider is not None and self._snapshot is snap:  # nothing changed meanwhile
                timeline = snap.timeline
                self.set_time(timeline.times[(timeline.index_at(self._slider_time()) + 1) % len(timeline)])

    def show_video(self, frames: np.ndarray, fps: float = 24.0, label: str = "Turntable") -> None:
        """Play frames ``[T, H, W, 3]`` uint8 in a loop in the GUI panel (a finished run's turntable)."""
        image = self.server.gui.add_image(frames[0], label=label, format="jpeg")

        def play() -> None:
            i = 0
            while not self._stop.wait(1.0 / fps):
                i = (i + 1) % len(frames)
                image.image = frames[i]

        threading.Thread(target=play, name="gen3d-viewer-video", daemon=True).start()

    def _draw_plot(self) -> None:
        if len(self._history) < 2:
            return
        import viser.uplot as uplot

        steps, losses = (np.array(v, dtype=np.float64) for v in zip(*self._history))
        data = (steps, losses)
        if self.plot is None:
            self.plot = self.server.gui.add_uplot(
                data, (uplot.Series(label="step"), uplot.Series(label="loss", stroke="#1f77b4", width=1.5)),
                title="loss", aspect=1.6, scales={"x": uplot.Scale(time=False)})
        else:
            self.plot.data = data

    def _draw_frustums(self, cameras: "Cameras") -> None:
        for f in self._frustums:
            f.remove()
        self._frustums = []
        for i in range(len(cameras)):
            c2w = cameras.c2w[i].detach().cpu().double().numpy()
            fovy = 2 * math.atan(0.5 * cameras.height / float(cameras.K[i, 1, 1]))
            self._frustums.append(self.server.scene.add_camera_frustum(
                f"/training_cameras/{i}", fov=fovy, aspect=cameras.width / cameras.height, scale=0.15,
                wxyz=matrix_quaternion(c2w[:3, :3]), position=c2w[:3, 3], color=(255, 140, 0),
                visible=self.cameras_shown))

    # ---- the viewer thread -------------------------------------------------------------------------
    def _render_loop(self) -> None:
        # One intra-op thread here (OpenMP's setting is per thread): two threads running parallel torch ops on one
        # OpenMP pool oversubscribe the cores, which cost training 21% on a field against 7% like this (2 cores).
        torch.set_num_threads(1)
        busy = 0.0
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                rendered = self._render_clients()
            except Exception as exc:  # a client that left mid-render, a render that failed: never stop training
                self.log(f"viewer: render skipped ({type(exc).__name__}: {str(exc)[:120]})")
                rendered = False
            busy = time.perf_counter() - t0 if rendered else 0.0
            # keep this thread's CPU share near render_share: sleep (1 - share) / share of the time it worked
            time.sleep(max(0.03, busy * (1 - self.render_share) / self.render_share))

    def _render_clients(self) -> bool:
        snap = self._snapshot
        if snap is None:
            return False
        mode = self.render_mode
        native = snap.splats is not None and mode == "rgb"
        render = snap.render
        t = None
        if snap.timeline is not None:  # render the time of the frame on show (t None: static, the key as before)
            slider = self.time_slider
            render = snap.timeline.render
            t = snap.timeline.times[snap.timeline.index_at(self._slider_time()) if slider is not None else 0]
        rendered = False
        for client_id, client in list(self.server.get_clients().items()):
            if native or render is None:
                if self._last.get(client_id) != ("native", self._snapshot_id):
                    client.scene.set_background_image(None)
                    self._last[client_id] = ("native", self._snapshot_id)
                continue
            cam = client.camera
            moving = time.time() - cam.update_timestamp < 0.3
            # a quarter while the camera moves; half while training runs (a paused or finished run gets it all)
            height = max(16, self.render_height // (4 if moving else 2 if self.training and not self.paused else 1))
            key = (repr(cam.wxyz), repr(cam.position), repr(cam.fov), repr(cam.aspect), height, mode,
                   self._snapshot_id) + (() if t is None else (t,))
            if self._last.get(client_id) == key:
                continue
            # recorded before rendering: a camera whose render fails is tried (and logged) once, not every 30 ms
            self._last[client_id] = key
            cameras = client_camera(cam, height)
            if cameras is None:  # NaN or infinite numbers in the client's camera: nothing to render
                continue
            with torch.no_grad():
                out = snap.render(cameras) if t is None else snap.timeline.render(cameras, t)
            if client_id not in self.server.get_clients():  # it left while this frame was rendering
                continue
            client.scene.set_background_image(mode_image(out, mode), format="jpeg", jpeg_quality=85)
            rendered = True
        for gone in set(self._last) - set(self.server.get_clients()):
            del self._last[gone]
        return rendered

    def close(self) -> None:
        self._stop.set()
        self._paused.clear()
        self._playing.clear()
        self._thread.join(timeout=5)
        if self._play_thread is not None:
            self._play_thread.join(timeout=5)
        with contextlib.redirect_stdout(io.StringIO()):
            self.server.stop()
