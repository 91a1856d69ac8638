"""Every GAIA attachment type reaches the policy as an observation, through the sandbox.

Images and audio go to a fake OpenAI-compatible server on loopback that checks each request is
what the real API takes (chat completions with an image content part; a multipart
/audio/transcriptions upload) and answers with facts about the bytes it received, so a passing
test shows the attachment's exact content made the trip.
"""

import base64
import email.parser
import email.policy
import hashlib
import http.server
import io
import json
import threading
import zipfile

import docx
import numpy as np
import openpyxl
import pptx
import pytest

from tests import tools_files_test
from toolr1_jax.agent import prompt
from toolr1_jax.sandbox import SandboxPool
from toolr1_jax.tools import files, media, registry

KEY = "media-key-7"
VISION_MODEL = "fake-vlm"
ASR_MODEL = "fake-whisper"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class _OpenAIHandler(http.server.BaseHTTPRequestHandler):
    """The two OpenAI endpoints the media tools use, strict about the request format."""

    requests: list = []
    fail_with: int | None = None

    def log_message(self, *args):
        pass

    def _reply(self, code: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, message: str):
        # The shape of OpenAI's error bodies; the client surfaces `message`.
        self._reply(400, {"error": {"message": message, "type": "invalid_request_error"}})

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).requests.append((self.path, dict(self.headers), body))
        if type(self).fail_with:
            return self._reply(type(self).fail_with, {"error": {"message": "server on fire"}})
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._reply(401, {"error": {"message": "bad key"}})
        if self.path == "/v1/chat/completions":
            return self._chat(body)
        if self.path == "/v1/audio/transcriptions":
            return self._transcription(body)
        return self._reply(404, {"error": {"message": f"no route {self.path}"}})

    def _chat(self, body: bytes):
        if not self.headers.get("Content-Type", "").startswith("application/json"):
            return self._error("chat completions take JSON")
        req = json.loads(body)
        if req.get("model") != VISION_MODEL:
            return self._error(f"unknown model {req.get('model')!r}")
        (message,) = req["messages"]
        if message["role"] != "user" or not isinstance(message["content"], list):
            return self._error("expected one user message with content parts")
        parts = {p["type"]: p for p in message["content"]}
        if set(parts) != {"text", "image_url"}:
            return self._error(f"expected a text and an image_url part, got {sorted(parts)}")
        url = parts["image_url"]["image_url"]["url"]
        header, _, payload = url.partition(",")
        if not (header.startswith("data:image/") and header.endswith(";base64")):
            return self._error(f"image_url must be a base64 data URL, got {header!r}")
        image = base64.b64decode(payload, validate=True)
        answer = (
            f"VLM saw {header[5:-7]} of {len(image)} bytes sha {_digest(image)}; "
            f"asked: {parts['text']['text']}"
        )
        return self._reply(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": VISION_MODEL,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer}}],
        })  # fmt: skip

    def _transcription(self, body: bytes):
        ctype = self.headers.get("Content-Type", "")
        if not ctype.startswith("multipart/form-data; boundary="):
            return self._error(f"transcriptions take multipart/form-data, got {ctype!r}")
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body
        )
        fields = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = (
                part.get_filename(),
                part.get_content_type(),
                part.get_payload(decode=True),
            )
        if fields.get("model", (None, None, b""))[2] != ASR_MODEL.encode():
            return self._error(f"model field must be {ASR_MODEL!r}")
        if "file" not in fields or not fields["file"][0]:
            return self._error("a file part with a filename is required")
        name, content_type, audio = fields["file"]
        text = f"heard {name} ({content_type}, {len(audio)} bytes, sha {_digest(audio)})"
        return self._reply(200, {"text": text})


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OpenAIHandler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


@pytest.fixture(autouse=True)
def _fresh_server_state():
    _OpenAIHandler.requests = []
    _OpenAIHandler.fail_with = None


def _tools(server_url: str | None):
    return [files.inspect_file_tool] + media.make_media_tools(
        vision_url=server_url or "",
        vision_model=VISION_MODEL,
        vision_api_key=KEY,
        transcription_url=server_url or "",
        transcription_model=ASR_MODEL,
        transcription_api_key=KEY,
        timeout_s=30.0,
    )


# ----------------------------------------------------------------------------------------------
# Attachments of every type in GAIA's validation and test sets, made here
# ----------------------------------------------------------------------------------------------


def _mov_with_speech_track() -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mov") as c:
        stream = c.add_stream("aac", rate=16000)
        stream.layout = "mono"
        t = np.arange(16000) / 16000
        frame = av.AudioFrame.from_ndarray(
            (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :],
            format="fltp",
            layout="mono",
        )
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            c.mux(packet)
        for packet in stream.encode(None):
            c.mux(packet)
    return buf.getvalue()


def _office(kind: str) -> bytes:
    buf = io.BytesIO()
    if kind == "xlsx":
        wb = openpyxl.Workbook()
        wb.active.append(["item", "qty"])
        wb.active.append(["zorblat", 17])
        wb.save(buf)
    elif kind == "docx":
        d = docx.Document()
        d.add_paragraph("Docx says Quimby.")
        d.save(buf)
    else:
        prs = pptx.Presentation()
        prs.slides.add_slide(prs.slide_layouts[5]).shapes.title.text = "Slide about crustaceans"
        prs.save(buf)
    return buf.getvalue()


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("data/table.csv", "name,score\nada,9\n")
        z.writestr("notes.txt", "zipped note 31337")
    return buf.getvalue()


PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
# Far larger than one frame of the sandbox's tool channel: it travels in chunks.
BIG_PNG = b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(3 * 2**20)
JPG = b"\xff\xd8\xff\xe0" + bytes(range(255, -1, -1)) * 3
MP3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" * 200
M4A = b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 300

# name -> (content, a string its observation must contain)
ATTACHMENTS = {
    "pic.png": (PNG, f"VLM saw image/png of {len(PNG)} bytes sha {_digest(PNG)}"),
    "big.png": (BIG_PNG, f"VLM saw image/png of {len(BIG_PNG)} bytes sha {_digest(BIG_PNG)}"),
    "photo.jpg": (JPG, f"VLM saw image/jpeg of {len(JPG)} bytes sha {_digest(JPG)}"),
    "talk.mp3": (MP3, f"heard talk.mp3 (audio/mpeg, {len(MP3)} bytes, sha {_digest(MP3)})"),
    "memo.m4a": (M4A, f"heard memo.m4a (audio/mp4, {len(M4A)} bytes, sha {_digest(M4A)})"),
    "clip.MOV": (None, "heard clip.wav (audio/wav, "),
    "archive.zip": (_zip(), "archive/data/table.csv (17 bytes)"),
    "protein.pdb": (b"HEADER    PROTEIN\nATOM      1  N   GLY A   1\n", "ATOM      1  N   GLY"),
    "graph.jsonld": (
        b'{"@context": "https://schema.org", "name": "Ld thing"}',
        '"name": "Ld thing"',
    ),
    "code.py": (b"print(6 * 7)\n", "print(6 * 7)"),
    "tree.xml": (b"<root><leaf>xml leaf 5</leaf></root>", "xml leaf 5"),
    "data.json": (b'{"answer": 42}', '"answer": 42'),
    "table.csv": (b"a,b\n1,2\n", "a,b\n1,2"),
    "plain.txt": (b"text file 99", "text file 99"),
    "sheet.xlsx": (_office("xlsx"), "zorblat | 17"),
    "doc.docx": (_office("docx"), "Docx says Quimby."),
    "slides.pptx": (_office("pptx"), "Slide about crustaceans"),
    "paper.pdf": (tools_files_test._pdf_bytes("Pdf text 2718"), "Pdf text 2718"),
}


@pytest.fixture(scope="module")
def attachments():
    out = {name: data for name, (data, _) in ATTACHMENTS.items()}
    out["clip.MOV"] = _mov_with_speech_track()
    return out


async def test_every_attachment_type_reaches_the_policy(server, attachments):
    async with SandboxPool(
        num_workers=1, timeout_s=60.0, memory_mb=1024, tools=_tools(server)
    ) as pool:
        s = await pool.open(files=attachments)
        try:
            for name, (_, expected) in ATTACHMENTS.items():
                r = await s.run(f"print(inspect_file({name!r}))")
                assert r.status == "ok", (name, r)
                assert expected in r.stdout, (name, r.stdout[:500])
            # The dedicated tools take a question, and the extracted zip is there to read.
            r = await s.run(
                "print(describe_image('pic.png', 'How many bars?'))\n"
                "print(transcribe_audio('talk.mp3'))\n"
                "print(inspect_file('archive/notes.txt'))"
            )
            assert r.status == "ok", r
            assert "asked: How many bars?" in r.stdout
            assert f"sha {_digest(MP3)}" in r.stdout
            assert "zipped note 31337" in r.stdout
        finally:
            await s.close()
    # The video went out as its audio track: a 16 kHz mono WAV, not the MOV's bytes.
    (wav_request,) = [b for p, _, b in _OpenAIHandler.requests if b'filename="clip.wav"' in b]
    assert b"RIFF" in wav_request and b"WAVEfmt " in wav_request


async def test_without_servers_the_policy_is_told_what_is_off(attachments):
    tools = _tools(None)
    assert [t.name for t in tools] == ["inspect_file"]
    async with SandboxPool(num_workers=1, timeout_s=30.0, memory_mb=1024, tools=tools) as pool:
        s = await pool.open(files={n: attachments[n] for n in ("pic.png", "talk.mp3", "clip.MOV")})
        try:
            r = await s.run("print(inspect_file('pic.png'))")
            assert r.status == "error"
            assert "image understanding is off" in r.error and "sandbox.vision_url" in r.error
            for name in ("talk.mp3", "clip.MOV"):
                r = await s.run(f"print(inspect_file({name!r}))")
                assert r.status == "error"
                assert "is off in this run" in r.error and "sandbox.transcription_url" in r.error
        finally:
            await s.close()
    assert _OpenAIHandler.requests == []


async def test_server_errors_name_the_server(server, attachments):
    _OpenAIHandler.fail_with = 500
    async with SandboxPool(
        num_workers=1, timeout_s=60.0, memory_mb=1024, tools=_tools(server)
    ) as pool:
        s = await pool.open(files={"pic.png": attachments["pic.png"]})
        try:
            r = await s.run("print(describe_image('pic.png'))")
        finally:
            await s.close()
    assert r.status == "error"
    assert f"vision model server at {server} failed (HTTP 500" in r.error


def test_host_halves_reject_what_the_api_would():
    uploads = media.Uploads(max_pending_bytes=10)
    with pytest.raises(media.MediaToolError, match="not base64"):
        uploads.append("u", "!!not base64!!")
    with pytest.raises(media.MediaToolError, match="at most"):
        uploads.append("u", base64.b64encode(b"x" * (media.CHUNK_BYTES + 3)).decode())
    # Past the pending limit the oldest uploads (abandoned by killed sessions) are dropped.
    assert [uploads.append(u, base64.b64encode(b"123456").decode()) for u in "ab"] == [6, 6]
    with pytest.raises(media.MediaToolError, match="no upload 'a'"):
        uploads.take("a")
    assert uploads.take("b") == b"123456"

    vision = media.VisionRequest(uploads, "http://127.0.0.1:9/v1", VISION_MODEL, KEY, 5.0)
    uploads.append("bmp", base64.b64encode(b"BM").decode())
    with pytest.raises(media.MediaToolError, match="not an image type"):
        vision("bmp", "a.bmp", "q")
    asr = media.TranscriptionRequest(uploads, "http://127.0.0.1:9/v1", ASR_MODEL, KEY, 5.0)
    with pytest.raises(media.MediaToolError, match="no audio track"):
        import av

        buf = io.BytesIO()
        with av.open(buf, "w", format="mov") as c:
            stream = c.add_stream("mpeg4", rate=1)
            stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                c.mux(packet)
            for packet in stream.encode(None):
                c.mux(packet)
        uploads.append("mov", base64.b64encode(buf.getvalue()).decode())
        asr("mov", "silent.mov")


def test_hidden_transports_stay_out_of_the_prompt(server):
    tools = _tools(server)
    assert [t.name for t in tools] == [
        "inspect_file", "describe_image", media.VISION_HOST_TOOL,
        "transcribe_audio", media.TRANSCRIPTION_HOST_TOOL, media.UPLOAD_HOST_TOOL,
    ]  # fmt: skip
    for template in ("{tools}", "{tool_signatures}"):
        text = prompt.render_system_prompt(template, tools, ())
        assert "describe_image(path: str" in text and "transcribe_audio(path: str)" in text
        assert "_request" not in text and "_upload" not in text
    assert not registry.render_tools([t for t in tools if t.hidden])


def test_zip_members_cannot_escape_and_bombs_are_refused(tmp_path, monkeypatch):
    bad = tmp_path / "evil.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("../outside.txt", "x")
    with pytest.raises(ValueError, match="outside the archive folder"):
        files.inspect_file(str(bad))
    assert not (tmp_path.parent / "outside.txt").exists()
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.bin", b"\x00" * 4096)
    monkeypatch.setattr(files, "MAX_UNZIPPED_BYTES", 1000)
    with pytest.raises(ValueError, match="4096 bytes unzipped, over the limit of 1000"):
        files.inspect_file(str(big))
