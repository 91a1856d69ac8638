"""`inspect_file(path)`: a task attachment rendered as text, by format, with maintained parsers.

Runs inside the sandbox (the attachment sits in the session's working directory). Parsers are
imported on first use so the pre-warmed parent stays lean.
"""

from __future__ import annotations

import json
import os
import re

from toolr1_jax.tools import media, registry

MAX_CHARS = 20_000
# Formats read as plain text: GAIA's attachments include py, xml and pdb (Protein Data Bank).
_TEXT_EXTENSIONS = {
    ".txt", ".md", ".markdown", ".py", ".log", ".yaml", ".yml", ".xml", ".tex", ".pdb", ".cif",
    ".sql", ".js", ".c", ".h", ".cpp", ".java", ".ini", ".cfg", ".toml", ".srt", ".vtt", ".rst",
    ".svg", ".kml", ".gpx", ".bib", ".fasta", ".fa",
}  # fmt: skip
# A zip is extracted into the working directory; these bounds keep a zip bomb from filling it.
MAX_UNZIPPED_BYTES = 500 * 2**20
MAX_ZIP_MEMBERS = 10_000


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    if b"\x00" in data[:4096]:
        raise ValueError(f"{path!r} looks binary, not text")
    return data.decode("utf-8", errors="replace")


def _json(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return json.dumps(json.load(f), indent=2, ensure_ascii=False)


def _cell(v) -> str:
    return "" if v is None else str(v)


def _xlsx(path: str) -> str:
    import openpyxl

    wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        out = []
        for ws in wb.worksheets:
            out.append(f"## Sheet: {ws.title}")
            for row in ws.iter_rows(values_only=True):
                cells = [_cell(v) for v in row]
                if any(cells):
                    out.append(" | ".join(cells))
        return "\n".join(out)
    finally:
        wb.close()


def _pdf(path: str) -> str:
    import pypdf

    reader = pypdf.PdfReader(path)
    pages = [f"## Page {i}\n{(page.extract_text() or '').strip()}" for i, page in
             enumerate(reader.pages, 1)]  # fmt: skip
    return "\n\n".join(pages)


def _table_rows(table) -> list[str]:
    return [" | ".join(cell.text.strip() for cell in row.cells) for row in table.rows]


def _docx(path: str) -> str:
    import docx

    doc = docx.Document(path)
    out = [p.text for p in doc.paragraphs if p.text.strip()]
    for t in doc.tables:
        out.append("")
        out.extend(_table_rows(t))
    return "\n".join(out)


def _pptx(path: str) -> str:
    import pptx

    prs = pptx.Presentation(path)
    out = []
    for i, slide in enumerate(prs.slides, 1):
        out.append(f"## Slide {i}")
        for shape in slide.shapes:
            if shape.has_text_frame and shape.text_frame.text.strip():
                out.append(shape.text_frame.text.strip())
            if getattr(shape, "has_table", False) and shape.has_table:
                out.extend(_table_rows(shape.table))
    return "\n".join(out)


def html_to_text(html: str) -> str:
    import bs4

    soup = bs4.BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    text = soup.get_text("\n")
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _html(path: str) -> str:
    return html_to_text(_read_text(path))


def _zip(path: str) -> str:
    import zipfile

    base = os.path.splitext(path)[0]
    dest = base if not os.path.exists(base) or os.path.isdir(base) else base + "_unzipped"
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise ValueError(f"{len(infos)} members, over the limit of {MAX_ZIP_MEMBERS}")
        total = sum(i.file_size for i in infos)
        if total > MAX_UNZIPPED_BYTES:
            raise ValueError(f"{total} bytes unzipped, over the limit of {MAX_UNZIPPED_BYTES}")
        for info in infos:
            parts = info.filename.replace("\\", "/").split("/")
            if info.filename.startswith("/") or ".." in parts:
                raise ValueError(f"member {info.filename!r} would land outside the archive folder")
        z.extractall(dest)
    lines = [f"Extracted {len(infos)} entries of {path} into {dest}/:"]
    for info in infos:
        if not info.is_dir():
            lines.append(f"  {os.path.join(dest, info.filename)} ({info.file_size} bytes)")
    lines.append("Call inspect_file on any of these paths to read it.")
    return "\n".join(lines)


def _image(path: str) -> str:
    return media.describe_image(path)


def _audio(path: str) -> str:
    return "Transcript:\n" + media.transcribe_audio(path)


_READERS = {
    ".csv": _read_text,
    ".tsv": _read_text,
    ".json": _json,
    ".jsonl": _read_text,
    ".xlsx": _xlsx,
    ".xlsm": _xlsx,
    ".pdf": _pdf,
    ".docx": _docx,
    ".pptx": _pptx,
    ".html": _html,
    ".htm": _html,
    ".jsonld": _json,
    ".geojson": _json,
    ".zip": _zip,
    **dict.fromkeys(media.IMAGE_TYPES, _image),
    **dict.fromkeys([*media.AUDIO_TYPES, *media.VIDEO_EXTENSIONS], _audio),
}


def inspect_file(path: str) -> str:
    """Return the content of a file as text: txt, md, csv, json/jsonld, xml, py, pdb, xlsx (every
    sheet), pdf (every page), docx (paragraphs and tables), pptx (every slide), html (visible
    text), zip (extracted next to it, its files listed), images (described by a vision model),
    audio and video (transcribed). Long content is cut to its first 20000 characters."""
    if not isinstance(path, str) or not path:
        raise ValueError("inspect_file: path must be a non-empty string")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"inspect_file: no such file {path!r}")
    ext = os.path.splitext(path)[1].lower()
    reader = _READERS.get(ext)
    if reader is None:
        if ext in _TEXT_EXTENSIONS or not ext:
            reader = _read_text
        else:
            try:
                return _cut(_read_text(path))
            except ValueError:
                raise ValueError(
                    f"inspect_file: unsupported file type {ext!r}; supported: "
                    + ", ".join(sorted({*_READERS, ".txt", ".md"}))
                ) from None
    try:
        text = reader(path)
    except media.MediaToolError:
        raise  # says what is off or what failed, naming the tool and the file
    except Exception as e:  # each parser has its own error types; name the file either way
        raise ValueError(f"inspect_file: could not read {path!r} as {ext or 'text'}: {e}") from e
    return _cut(text)


def _cut(text: str) -> str:
    if len(text) <= MAX_CHARS:
        return text
    return text[:MAX_CHARS] + f"\n... [{len(text) - MAX_CHARS} more characters not shown]"


inspect_file_tool = registry.make_tool(inspect_file)
