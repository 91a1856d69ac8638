"""Images, audio and video for the policy, through OpenAI-compatible model servers.

`describe_image` asks a vision-language chat model (chat completions with an image content
part); `transcribe_audio` sends audio, or a video's audio track, to a speech-to-text server
(`/audio/transcriptions`). The sandbox has no network, so each tool has two halves: the policy
calls an in-sandbox function that reads the file from its working directory and uploads the
bytes to the host in chunks (base64, through a hidden host tool; the channel takes small frames
only), then asks a second hidden host tool to make the request. Without a configured server
there is no host half, and the tool says so when called.
"""

from __future__ import annotations

import base64
import binascii
import collections
import io
import os
import sys
import threading
import uuid

from toolr1_jax.tools import registry

# What chat-completion image parts accept (OpenAI's list; vLLM and SGLang take the same).
IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
}
# What /audio/transcriptions accepts.
AUDIO_TYPES = {
    ".mp3": "audio/mpeg",
    ".mpga": "audio/mpeg",
    ".mpeg": "audio/mpeg",
    ".m4a": "audio/mp4",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".webm": "audio/webm",
}
# Containers whose audio track is extracted on the host (PyAV) before transcription.
VIDEO_EXTENSIONS = (".mov", ".mp4", ".m4v", ".avi", ".mkv", ".wmv", ".flv", ".3gp")

MAX_FILE_BYTES = 40 * 2**20
# The sandbox bounds a host-tool call's arguments (256 KiB today); a chunk's base64 stays well
# below that.
CHUNK_BYTES = 128 * 2**10
# Uploads held on the host at once (abandoned ones, from killed sessions, are evicted oldest
# first past this).
MAX_PENDING_BYTES = 4 * MAX_FILE_BYTES

UPLOAD_HOST_TOOL = "_media_upload"
VISION_HOST_TOOL = "_vision_request"
TRANSCRIPTION_HOST_TOOL = "_transcription_request"
DEFAULT_IMAGE_QUESTION = (
    "Describe this image in detail: every object, person, text, number, label, colour and their "
    "positions, so that someone who cannot see it can answer questions about it."
)


class MediaToolError(Exception):
    """A media tool could not do what was asked; the message is shown to the policy."""


# ----------------------------------------------------------------------------------------------
# In-sandbox halves (what the policy calls)
# ----------------------------------------------------------------------------------------------


def _host_half(name: str):
    # The worker binds each host tool's stub in the policy's namespace, which is the globals of
    # the frame that called into this module; no other handle on it reaches tool code.
    frame = sys._getframe(1)
    while frame is not None:
        stub = frame.f_globals.get(name)
        if stub is not None and callable(stub) and frame.f_globals.get("__name__") == "__main__":
            return stub
        frame = frame.f_back
    return None


def _read(tool: str, path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    if not isinstance(path, str) or not path:
        raise ValueError(f"{tool}: path must be a non-empty string")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{tool}: no such file {path!r}")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise MediaToolError(
            f"{tool}: {path!r} is {size / 2**20:.1f} MiB, over the {max_bytes // 2**20} MiB "
            "that can be sent to the model server"
        )
    with open(path, "rb") as f:
        return f.read()


def _off(tool: str, path: str, what: str, keys: str) -> MediaToolError:
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    return MediaToolError(
        f"{tool}: {what} is off in this run: no model server is configured for it ({keys} is "
        f"empty). The content of {path!r} ({size} bytes) cannot be read; work from the question "
        "and the other files."
    )


def _forward(tool: str, stub, data: bytes, *args) -> str:
    upload = _host_half(UPLOAD_HOST_TOOL)
    if upload is None:  # make_media_tools adds it with every server; a hand-built list may not
        raise MediaToolError(f"{tool}: the {UPLOAD_HOST_TOOL} host tool is missing")
    upload_id = uuid.uuid4().hex  # unguessable, so no other session can take this upload
    try:
        # One chunk at least, so that an empty file is an upload too.
        for start in range(0, max(len(data), 1), CHUNK_BYTES):
            upload(upload_id, base64.b64encode(data[start : start + CHUNK_BYTES]).decode("ascii"))
        return str(stub(upload_id, *args))
    except RuntimeError as e:  # the stub's wrapping of the host's error message
        raise MediaToolError(f"{tool}: {e}") from None


def describe_image(path: str, question: str = DEFAULT_IMAGE_QUESTION) -> str:
    """Show an image file (png, jpg, gif, webp) to a vision-language model and return its answer
    to `question` (by default, a detailed description of everything in the image, text and
    numbers included). Ask a precise question to get a precise answer."""
    ext = os.path.splitext(path)[1].lower() if isinstance(path, str) else ""
    if ext not in IMAGE_TYPES:
        raise MediaToolError(
            f"describe_image: {path!r} is not an image it can send; supported: "
            + ", ".join(IMAGE_TYPES)
        )
    data = _read("describe_image", path)
    stub = _host_half(VISION_HOST_TOOL)
    if stub is None:
        raise _off("describe_image", path, "image understanding", "sandbox.vision_url")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("describe_image: question must be a non-empty string")
    return _forward("describe_image", stub, data, os.path.basename(path), question)


def transcribe_audio(path: str) -> str:
    """Transcribe the speech in an audio file (mp3, m4a, wav, flac, ogg, webm) or in the audio
    track of a video (mov, mp4, avi, mkv) with a speech-to-text model; returns the text."""
    ext = os.path.splitext(path)[1].lower() if isinstance(path, str) else ""
    if ext not in AUDIO_TYPES and ext not in VIDEO_EXTENSIONS:
        raise MediaToolError(
            f"transcribe_audio: {path!r} is not an audio or video file; supported: "
            + ", ".join([*AUDIO_TYPES, *VIDEO_EXTENSIONS])
        )
    data = _read("transcribe_audio", path)
    stub = _host_half(TRANSCRIPTION_HOST_TOOL)
    if stub is None:
        what = "transcribing a video's audio track" if ext in VIDEO_EXTENSIONS else "transcription"
        raise _off("transcribe_audio", path, what, "sandbox.transcription_url")
    return _forward("transcribe_audio", stub, data, os.path.basename(path))


# ----------------------------------------------------------------------------------------------
# Host halves (the requests)
# ----------------------------------------------------------------------------------------------


class Uploads:
    """Host half of the chunked upload: files in transit from sandboxes, by upload id.

    One store serves every session of a pool; host tools run in executor threads, hence the lock.
    """

    def __init__(self, max_pending_bytes: int = MAX_PENDING_BYTES):
        self.max_pending_bytes = max_pending_bytes
        self._data: collections.OrderedDict[str, bytearray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def append(self, upload_id: str, data_b64: str) -> int:
        """Adds a chunk; returns the upload's size so far."""
        if not isinstance(upload_id, str) or not isinstance(data_b64, str):
            raise MediaToolError("upload id and data must be strings")
        if len(data_b64) > CHUNK_BYTES * 4 // 3 + 4:
            raise MediaToolError(f"a chunk holds at most {CHUNK_BYTES} bytes")
        try:
            chunk = base64.b64decode(data_b64, validate=True)
        except binascii.Error as e:
            raise MediaToolError(f"the data is not base64 ({e})") from None
        with self._lock:
            buf = self._data.setdefault(upload_id, bytearray())
            if len(buf) + len(chunk) > MAX_FILE_BYTES:
                del self._data[upload_id]
                raise MediaToolError(f"the file is over {MAX_FILE_BYTES // 2**20} MiB")
            buf += chunk
            self._data.move_to_end(upload_id)
            while len(self._data) > 1 and (
                sum(map(len, self._data.values())) > self.max_pending_bytes
            ):
                self._data.popitem(last=False)
            return len(buf)

    def take(self, upload_id: str) -> bytes:
        with self._lock:
            buf = self._data.pop(upload_id, None)
        if buf is None:
            raise MediaToolError(f"no upload {upload_id!r} (it was never sent, or evicted)")
        return bytes(buf)


def _client(base_url: str, api_key: str | None, timeout_s: float):
    import openai

    # openai refuses an empty key; local servers (vLLM, whisper servers) ignore it.
    return openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout_s)


def _server_error(what: str, base_url: str, e: Exception) -> MediaToolError:
    import openai

    if isinstance(e, openai.APIStatusError):
        detail = f"HTTP {e.status_code}: {str(e.message)[:500]}"
    else:
        detail = f"{type(e).__name__}: {e}"
    return MediaToolError(f"the {what} server at {base_url} failed ({detail})")


class _Request:
    """What both requests hold: the upload store and the server to call."""

    def __init__(
        self, uploads: Uploads, base_url: str, model: str, api_key: str | None, timeout_s: float
    ):
        self.uploads = uploads
        self.base_url = base_url
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s


class VisionRequest(_Request):
    """Host half of `describe_image`: one chat completion with the image as a data URL."""

    def __call__(self, upload_id: str, file_name: str, question: str) -> str:
        import openai

        data = self.uploads.take(upload_id)
        ext = os.path.splitext(str(file_name))[1].lower()
        if ext not in IMAGE_TYPES:
            raise MediaToolError(f"{file_name}: not an image type the server takes")
        data_b64 = base64.b64encode(data).decode("ascii")
        content = [
            {"type": "text", "text": str(question)},
            {
                "type": "image_url",
                "image_url": {"url": f"data:{IMAGE_TYPES[ext]};base64,{data_b64}"},
            },
        ]
        client = _client(self.base_url, self.api_key, self.timeout_s)
        try:
            completion = client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": content}]
            )
        except openai.OpenAIError as e:
            raise _server_error("vision model", self.base_url, e) from None
        if not completion.choices or completion.choices[0].message.content is None:
            raise MediaToolError(f"the vision model at {self.base_url} returned no text")
        return completion.choices[0].message.content


def video_audio_track(data: bytes, file_name: str) -> bytes:
    """The first audio track of a video as 16 kHz mono WAV (what speech models are trained on)."""
    try:
        import av
    except ImportError:
        raise MediaToolError(
            f"{file_name}: video is not supported on this host: reading its audio track needs "
            "PyAV (`pip install av`)"
        ) from None
    try:
        with av.open(io.BytesIO(data)) as src:
            if not src.streams.audio:
                raise MediaToolError(f"{file_name}: the video has no audio track to transcribe")
            out = io.BytesIO()
            with av.open(out, "w", format="wav") as dst:
                stream = dst.add_stream("pcm_s16le", rate=16000)
                stream.layout = "mono"
                resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
                for frame in src.decode(audio=0):
                    for resampled in resampler.resample(frame):
                        dst.mux(stream.encode(resampled))
                for resampled in resampler.resample(None):
                    dst.mux(stream.encode(resampled))
                dst.mux(stream.encode(None))
            return out.getvalue()
    except av.FFmpegError as e:
        raise MediaToolError(f"{file_name}: cannot read the video ({e})") from None


class TranscriptionRequest(_Request):
    """Host half of `transcribe_audio`: one multipart POST to /audio/transcriptions."""

    def __call__(self, upload_id: str, file_name: str) -> str:
        import openai

        data = self.uploads.take(upload_id)
        stem, ext = os.path.splitext(str(file_name))
        ext = ext.lower()
        if ext in VIDEO_EXTENSIONS:
            data, file_name, ext = video_audio_track(data, file_name), f"{stem}.wav", ".wav"
        if ext not in AUDIO_TYPES:
            raise MediaToolError(f"{file_name}: not an audio type the server takes")
        client = _client(self.base_url, self.api_key, self.timeout_s)
        try:
            result = client.audio.transcriptions.create(
                model=self.model, file=(file_name, data, AUDIO_TYPES[ext])
            )
        except openai.OpenAIError as e:
            raise _server_error("transcription", self.base_url, e) from None
        return result.text


def make_media_tools(
    *,
    vision_url: str,
    vision_model: str,
    vision_api_key: str | None,
    transcription_url: str,
    transcription_model: str,
    transcription_api_key: str | None,
    timeout_s: float,
) -> list[registry.Tool]:
    """For each server with a URL ("" = off), its tool and the hidden host tool that serves it,
    plus the hidden upload tool they share.

    Off tools are left out of the prompt; `inspect_file` still meets images and audio and then
    says which server is missing.
    """
    uploads = Uploads()
    tools = []
    for fn, url, name, cls, model, key in (
        (describe_image, vision_url, VISION_HOST_TOOL, VisionRequest, vision_model, vision_api_key),
        (
            transcribe_audio,
            transcription_url,
            TRANSCRIPTION_HOST_TOOL,
            TranscriptionRequest,
            transcription_model,
            transcription_api_key,
        ),
    ):
        if not url:
            continue
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{fn.__name__}: the server URL must be http(s), got {url!r}")
        if not model:
            raise ValueError(f"{fn.__name__}: a server URL is set but no model name")
        tools.append(registry.make_tool(fn))
        tools.append(
            registry.make_tool(
                cls(uploads, url, model, key, timeout_s),
                name=name,
                doc=f"Transport of {fn.__name__} to {url}; the policy does not call it.",
                host=True,
                hidden=True,
            )
        )
    if tools:
        tools.append(
            registry.make_tool(
                uploads.append,
                name=UPLOAD_HOST_TOOL,
                doc="Receives a chunk of a file for the media tools; the policy does not call it.",
                host=True,
                hidden=True,
            )
        )
    return tools
