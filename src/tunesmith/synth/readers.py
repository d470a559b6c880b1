"""Documents to normalised text with page spans; headings become Markdown `#` lines for chunking."""

from __future__ import annotations

import glob
import html.parser
import re
from dataclasses import dataclass, field
from pathlib import Path

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx")


class ReaderError(Exception):
    """A document that cannot be read, with what to do about it."""


@dataclass
class Document:
    path: str
    text: str
    pages: list[tuple[int, int, int]] = field(default_factory=list)
    """(page number from 1, start, end) character spans of `text`, for PDFs."""

    def page_at(self, offset: int) -> int | None:
        for page, start, end in self.pages:
            if start <= offset < end:
                return page
        return None


_BLOCK = re.compile(r"^(#{1,6}\s|[-*+]\s|\d+[.)]\s|>)")


def normalise(text: str) -> str:
    """One space between words, lines joined into paragraphs, words hyphenated at line ends rejoined."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    text = re.sub(r"(\w)-\n[ \t]*(\w)", r"\1\2", text)
    paragraphs = []
    for para in re.split(r"\n[ \t]*\n", text):
        lines = [re.sub(r"[ \t]+", " ", ln).strip() for ln in para.split("\n")]
        out: list[str] = []
        for ln in lines:
            if not ln:
                continue
            if out and not _BLOCK.match(ln) and not out[-1].startswith("#"):
                out[-1] += " " + ln
            else:
                out.append(ln)
        if out:
            paragraphs.append("\n".join(out))
    return "\n\n".join(paragraphs)


class _HTMLText(html.parser.HTMLParser):
    _SKIP = {"script", "style", "head"}
    _BLOCKS = {"p", "div", "li", "br", "tr", "section", "article", "pre", "blockquote", "table"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag in self._SKIP:
            self._skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self._BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip = max(0, self._skip - 1)
        elif re.fullmatch(r"h[1-6]", tag) or tag in self._BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data.replace("\n", " "))


def _need(module: str, package: str, suffix: str) -> object:
    try:
        return __import__(module)
    except ImportError:
        raise ReaderError(f"reading {suffix} files needs {package}: pip install {package}") from None


def read_document(path: str | Path) -> Document:
    """One file as a `Document`; unknown suffixes and missing parsers raise `ReaderError`."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".txt", ".md", ".markdown"):
        return Document(str(p), normalise(p.read_text(encoding="utf-8", errors="replace")))
    if suffix in (".html", ".htm"):
        parser = _HTMLText()
        parser.feed(p.read_text(encoding="utf-8", errors="replace"))
        return Document(str(p), normalise("".join(parser.parts)))
    if suffix == ".pdf":
        _need("pypdf", "pypdf", suffix)
        from pypdf import PdfReader

        text, pages = "", []
        for i, page in enumerate(PdfReader(str(p)).pages, start=1):
            body = normalise(page.extract_text() or "")
            if not body:
                continue
            if text:
                text += "\n\n"
            pages.append((i, len(text), len(text) + len(body)))
            text += body
        return Document(str(p), text, pages)
    if suffix == ".docx":
        _need("docx", "python-docx", suffix)
        import docx

        lines = []
        for para in docx.Document(str(p)).paragraphs:
            style = (para.style.name or "") if para.style is not None else ""
            level = re.fullmatch(r"Heading (\d)", style)
            lines.append(("#" * int(level.group(1)) + " " if level else "") + para.text)
        return Document(str(p), normalise("\n\n".join(lines)))
    raise ReaderError(f"{p}: unsupported document type {suffix!r} (supported: {', '.join(SUFFIXES)})")


def resolve_documents(specs: list[str]) -> list[Path]:
    """Files named by paths, folders (searched recursively for known suffixes) and globs, sorted."""
    found: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
            if not matches:
                raise ReaderError(f"{spec}: no such file, folder or matching glob")
            found += matches
    return list(dict.fromkeys(found))
