"""What the viewer exposes: where it listens, and what a client can make it do.

The client here is a real one speaking viser's own protocol over a websocket (what the browser sends, built with
viser's message classes), so it can send what no browser would: out-of-range and NaN numbers, strings where numbers
go, path-like file names, updates to read-only readouts, file uploads to any control, share requests.
"""

import math
import socket
import threading
import urllib.request
import uuid

import pytest
import torch

from gen3d.viewer.server import MODES, RESOLUTIONS, Viewer, free_port
from gen3d.viewer.snapshots import gaussian_snapshot
from tests.viewer.waiting import wait_for

TCP_LISTEN = "0A"


def listening_addresses(port: int) -> set[str]:
    """The local addresses of this machine's TCP sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == TCP_LISTEN and int(hex_port, 16) == port:
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, words))
    return found


def other_ipv4_addresses() -> list[str]:
    """This machine's IPv4 addresses outside the loopback network (may be empty in a sandbox)."""
    addresses = set()
    try:
        import psutil

        addresses |= {a.address for nic in psutil.net_if_addrs().values() for a in nic if a.family == socket.AF_INET}
    except ImportError:
        pass
    try:
        addresses |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    except OSError:
        pass
    return sorted(a for a in addresses if not a.startswith("127."))


def http_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status


class RawClient:
    """A viser client over a plain websocket: sends viser messages as given, counts what the server sends back."""

    def __init__(self, port: int) -> None:
        import viser
        from websockets.sync.client import connect

        self.ws = connect(f"ws://127.0.0.1:{port}", subprotocols=[f"viser-v{viser.__version__}"],
                          max_size=None, open_timeout=20)
        self.received: list[bytes] = []
        self.decoded: list[str] = []  # the types of the messages in received[:frames_decoded]
        self.frames_decoded = 0
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        try:
            for raw in self.ws:
                self.received.append(raw if isinstance(raw, bytes) else raw.encode())
        except Exception:  # the connection closed
            pass
        self.closed.set()

    def send(self, message) -> None:
        import msgspec

        self.ws.send(msgspec.msgpack.encode(message.as_serializable_dict()))

    def camera(self, wxyz=(1.0, 0.0, 0.0, 0.0), position=(0.0, 0.0, -2.5), fov=0.8, width=64, height=64) -> None:
        from viser import _messages

        self.send(_messages.ViewerCameraMessage(wxyz=wxyz, position=position, fov=fov, near=0.01, far=100.0,
                                                image_height=height, image_width=width, look_at=(0.0, 0.0, 0.0),
                                                up_direction=(0.0, 0.0, 1.0)))

    def update(self, handle, **updates) -> None:
        from viser import _messages

        self.send(_messages.GuiUpdateMessage(handle._impl.uuid, updates))

    def types(self) -> list[str]:
        """The type of every message the server sent, in order. Each websocket frame is a window of messages in
        viser's wire format: two little-endian uint64 sizes (msgpack, then zstd-compressed), the zstd-compressed
        msgpack {"messages": [...], ...}, then raw binary buffers."""
        import msgspec
        import zstandard

        frames = list(self.received)
        for raw in frames[self.frames_decoded:]:  # each frame once, however often a test polls
            size, compressed = int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:16], "little")
            inner = zstandard.ZstdDecompressor().decompress(raw[16:16 + compressed], max_output_size=size)
            self.decoded += [m["type"] for m in msgspec.msgpack.decode(inner)["messages"]]
        self.frames_decoded = len(frames)
        return list(self.decoded)

    def count(self, message_type: str) -> int:
        return self.types().count(message_type)

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def viewer(tmp_path, monkeypatch):
    """A viewer of a small Gaussian ball, started from an empty working folder; its log lines in `viewer.lines`."""
    from gen3d.representations.gaussians import GaussianModel

    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    v = Viewer(port=free_port("127.0.0.1", 8900), resolution=64, log=lines.append)
    v.lines = lines
    model = GaussianModel.random_ball(generator=torch.Generator().manual_seed(0))
    v.publish(gaussian_snapshot(model, step=1))
    yield v
    v.close()


def files_under(root) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def test_the_viewer_listens_on_loopback_only_unless_asked():
    lines = []
    local = Viewer(port=free_port("127.0.0.1", 8950), log=lines.append)
    try:
        assert listening_addresses(local.port) == {"127.0.0.1"}
        assert http_status(f"http://127.0.0.1:{local.port}/") == 200
        for address in other_ipv4_addresses():  # the machine's other interfaces: nothing listens there
            with pytest.raises(OSError):
                socket.create_connection((address, local.port), timeout=5).close()
        assert not any("listening on" in line for line in lines)
    finally:
        local.close()
    exposed = Viewer(host="0.0.0.0", port=free_port("0.0.0.0", 8970), log=lines.append)
    try:
        assert listening_addresses(exposed.port) == {"0.0.0.0"}
        assert any(f"listening on 0.0.0.0: anyone who can reach this machine on port {exposed.port}" in line
                   for line in lines)
    finally:
        exposed.close()


def test_crafted_control_values_neither_crash_the_server_nor_write_files(viewer, tmp_path):
    from viser import _messages

    before = files_under(tmp_path)
    outside = tmp_path.parent / f"escaped-{uuid.uuid4().hex}"
    client = RawClient(viewer.port)
    client.camera()
    wait_for(lambda: len(viewer.server.get_clients()) == 1, what="the client")
    step_text = viewer.step_text.value
    crafted_strings = ["../../etc/passwd", str(outside), "/etc/shadow", "x" * 200_000, "rgb\x00../", ""]
    crafted_numbers = [math.nan, math.inf, -math.inf, 1e12, -5, 2**63 - 1, -2**63]
    for value in crafted_strings + crafted_numbers:
        client.update(viewer.mode, value=value)
        client.update(viewer.resolution, value=value)
        client.update(viewer.show_cameras, value=value)
        client.update(viewer.step_text, value=value)  # a read-only readout
    client.update(viewer.pause_button, update_cb=[])  # would drop the button's callbacks
    client.update(viewer.export_button, value=True, label="../../x")
    for name in ("../../" + outside.name, str(outside)):  # an upload aimed at a control that is no upload button
        transfer = uuid.uuid4().hex
        client.send(_messages.FileTransferStartUpload(viewer.resolution._impl.uuid, transfer, name, "text/plain", 1, 5))
        client.send(_messages.FileTransferPart(viewer.resolution._impl.uuid, transfer, 0, b"owned"))
    client.send(_messages.ShareUrlRequest())
    for camera in (dict(position=(math.nan, 0.0, 0.0)), dict(wxyz=(0.0, 0.0, 0.0, 0.0)), dict(fov=math.nan),
                   dict(fov=0.0), dict(width=10**9, height=1), dict(position=(1e300, 1e300, 1e300))):
        client.camera(**camera)
    client.update(viewer.mode, value="depth")  # the last word: a real mode, rendered by the server
    client.camera()
    wait_for(lambda: viewer.mode.value == "depth", what=f"the depth mode (shows {viewer.mode.value!r:.40}, client closed: {client.closed.is_set()})")
    wait_for(lambda: client.count("BackgroundImageMessage") > 0, what="a server render after the crafted cameras")
    wait_for(lambda: any("share URL; refused" in line for line in viewer.lines), what="the refused share request")

    assert viewer.render_mode in MODES and RESOLUTIONS[0] <= viewer.render_height <= RESOLUTIONS[1]
    assert viewer.resolution.value == viewer.render_height  # what every browser is shown is the value in use
    assert isinstance(viewer.cameras_shown, bool)
    assert viewer.step_text.value == step_text, "a client edited a read-only readout"
    assert viewer.server._share_tunnel is None
    assert viewer._thread.is_alive()
    assert sum("render skipped" in line for line in viewer.lines) <= 2  # logged once per camera, not every frame
    client.update(viewer.pause_button, value=True)  # the button still works
    wait_for(lambda: viewer.paused, what="Pause after the crafted messages")
    assert http_status(f"http://127.0.0.1:{viewer.port}/") == 200
    second = RawClient(viewer.port)  # the server takes new clients
    second.camera()
    wait_for(lambda: len(viewer.server.get_clients()) == 2, what="a second client")
    client.close()
    second.close()
    assert files_under(tmp_path) == before, "a client's message wrote a file"
    assert not outside.exists() and not (tmp_path.parent / outside.name).exists()


def test_a_crafted_time_value_shows_a_real_frame(viewer):
    from gen3d.viewer.protocol import Snapshot, Timeline

    splats = viewer._snapshot.splats
    viewer.publish(Snapshot(step=2, splats=splats, timeline=Timeline([0.0, 0.5, 1.0], [splats] * 3)))
    client = RawClient(viewer.port)
    client.camera()
    for value in (math.nan, math.inf, "../../x", [0.5], -1e30):  # dropped, dropped, dropped, dropped, clamped to 0
        client.update(viewer.time_slider, value=value)
    client.update(viewer.time_slider, value=0.5)
    wait_for(lambda: viewer.shown_time == 0.5, what="the last, valid time")
    for value in (math.nan, 7.0):  # NaN is dropped (the slider keeps 0.5), 7 is clamped to the end
        client.update(viewer.time_slider, value=value)
    wait_for(lambda: viewer.time_slider.value == 1.0, what="7 clamped to 1")
    # the viewer's thread shows the frame after the value is stored: wait for it rather than race it
    wait_for(lambda: viewer.shown_time == 1.0 and viewer._frame_shown[1] == 2, what="the last frame shown")
    client.close()


@pytest.mark.slow
def test_export_now_from_a_client_writes_inside_the_run_folder_only(tiny_pixel_prior, tmp_path, monkeypatch):
    from gen3d.cli import load_run_config
    from gen3d.runs import new_run_dir
    from gen3d.systems.base import Interrupted, write_config
    from tests.systems.conftest import fast_overrides

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    o = fast_overrides(tiny_pixel_prior, tmp_path / "outputs", steps=100000) + [
        "viewer.enabled=true", f"viewer.port={free_port('127.0.0.1', 8990)}", "val_every=0", "checkpoint_every=0",
        "cameras.batch_size=1", "exports=[splat-ply]"]
    cls, cfg = load_run_config("dreamgaussian", ["prompt=a red mug", *o])
    run = new_run_dir(cfg.output_dir, cls.name, cfg.prompt)
    write_config(run, cfg)
    system = cls(cfg, run)
    errors = []

    def fit():
        try:
            system.fit()
        except Interrupted:
            pass
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    before = files_under(tmp_path)
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    try:
        wait_for(lambda: getattr(system, "viewer", None) is not None and system.step > 2, timeout=120, what="training")
        viewer = system.viewer
        client = RawClient(viewer.port)
        client.camera()
        client.update(viewer.export_button, value=True, label="../../../escaped.ply")
        client.update(viewer.export_button, value="/tmp/escaped.ply")  # a button's value: cast to bool, a click
        wait_for(lambda: (run / "export" / "gaussians.ply").is_file() or any((run / "export").glob("*.ply")),
                 timeout=120, what="the export")
        client.close()
    finally:
        system._interrupt = True
        thread.join(timeout=120)
    assert not errors, errors
    new = files_under(tmp_path) - before
    assert new and all(p.startswith(str(run)) for p in new), sorted(p for p in new if not p.startswith(str(run)))
    assert not list(work.iterdir())
