"""inspect_file on real files of every supported format, written by the test."""

import json

import docx
import openpyxl
import pptx
import pytest

from toolr1_jax.sandbox import SandboxPool
from toolr1_jax.tools import files


def _pdf_bytes(text: str) -> bytes:
    """A one-page PDF (Helvetica text), with a correct xref table."""
    content = f"BT /F1 24 Tf 72 700 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def _xlsx(path):
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "Sales"
    ws.append(["city", "units"])
    ws.append(["Zorbton", 1234])
    wb.create_sheet("Notes").append(["checked by", "Quimby"])
    wb.save(path)


def _docx(path):
    d = docx.Document()
    d.add_paragraph("The Quimby report.")
    t = d.add_table(rows=2, cols=2)
    t.cell(0, 0).text, t.cell(0, 1).text = "river", "length"
    t.cell(1, 0).text, t.cell(1, 1).text = "Quimby", "412 km"
    d.save(path)


def _pptx(path):
    prs = pptx.Presentation()
    slide = prs.slides.add_slide(prs.slide_layouts[1])
    slide.shapes.title.text = "Zorblat results"
    slide.placeholders[1].text = "Flux rose by 17%"
    prs.slides.add_slide(prs.slide_layouts[5]).shapes.title.text = "Second slide"
    prs.save(path)


@pytest.fixture
def sample_files(tmp_path):
    (tmp_path / "a.txt").write_text("plain text line\n")
    (tmp_path / "b.md").write_text("# Title\n\nSome *markdown*.\n")
    (tmp_path / "c.csv").write_text("name,score\nada,9\n")
    (tmp_path / "d.json").write_text(json.dumps({"answer": 42, "items": ["x", "y"]}))
    (tmp_path / "e.html").write_text(
        "<html><head><style>p{}</style><script>var s=1;</script></head>"
        "<body><h1>Heading</h1><p>Visible <b>text</b> here.</p></body></html>"
    )
    (tmp_path / "f.pdf").write_bytes(_pdf_bytes("Hello PDF 1234"))
    _xlsx(tmp_path / "g.xlsx")
    _docx(tmp_path / "h.docx")
    _pptx(tmp_path / "i.pptx")
    return tmp_path


def test_every_format(sample_files):
    p = lambda name: str(sample_files / name)
    assert files.inspect_file(p("a.txt")) == "plain text line\n"
    assert "Some *markdown*." in files.inspect_file(p("b.md"))
    assert files.inspect_file(p("c.csv")) == "name,score\nada,9\n"
    assert json.loads(files.inspect_file(p("d.json"))) == {"answer": 42, "items": ["x", "y"]}
    html = files.inspect_file(p("e.html"))
    assert "Heading" in html and "Visible" in html and "text" in html
    assert "var s" not in html and "p{}" not in html
    assert "Hello PDF 1234" in files.inspect_file(p("f.pdf"))
    xlsx = files.inspect_file(p("g.xlsx"))
    assert "## Sheet: Sales" in xlsx and "Zorbton | 1234" in xlsx and "checked by | Quimby" in xlsx
    d = files.inspect_file(p("h.docx"))
    assert "The Quimby report." in d and "Quimby | 412 km" in d
    s = files.inspect_file(p("i.pptx"))
    assert "## Slide 1" in s and "Zorblat results" in s and "Flux rose by 17%" in s
    assert "## Slide 2" in s and "Second slide" in s


def test_errors_name_the_problem(sample_files):
    with pytest.raises(FileNotFoundError, match="no such file"):
        files.inspect_file(str(sample_files / "missing.txt"))
    (sample_files / "bad.xlsx").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="could not read .*bad.xlsx"):
        files.inspect_file(str(sample_files / "bad.xlsx"))
    (sample_files / "blob.bin").write_bytes(b"\x00\x01\x02" * 10)
    with pytest.raises(ValueError, match="unsupported file type"):
        files.inspect_file(str(sample_files / "blob.bin"))


def test_long_content_is_cut(tmp_path):
    (tmp_path / "long.txt").write_text("z" * (files.MAX_CHARS + 500))
    out = files.inspect_file(str(tmp_path / "long.txt"))
    assert out.startswith("z" * 100) and "500 more characters" in out
    assert len(out) < files.MAX_CHARS + 100


async def test_inspect_file_inside_the_sandbox(sample_files):
    attachments = {n: (sample_files / n).read_bytes() for n in ("f.pdf", "g.xlsx", "h.docx")}
    async with SandboxPool(
        num_workers=1, timeout_s=20.0, memory_mb=1024, tools=[files.inspect_file_tool]
    ) as pool:
        s = await pool.open(files=attachments)
        r = await s.run("for name in ['f.pdf', 'g.xlsx', 'h.docx']:\n    print(inspect_file(name))")
        assert r.status == "ok", r
        assert "Hello PDF 1234" in r.stdout and "Zorbton | 1234" in r.stdout
        assert "Quimby | 412 km" in r.stdout
