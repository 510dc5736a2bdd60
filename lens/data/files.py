"""Reading annotation files as they occur in the wild: encodings, byte-order marks, line endings,
and image files stored under another extension or letter case.

* :func:`decode_text` turns bytes into text: a byte-order mark picks UTF-8 / UTF-16 / UTF-32, else
  the given encodings are tried in order (UTF-8 first). It returns the encoding used.
* :func:`read_json` parses a whole JSON file; errors name the file, line and column.
* :func:`iter_jsonl` yields ``(line_no, object)`` for a JSONL file (BOM and CRLF tolerated, line
  numbers as an editor shows them); errors name ``file:line``.
* :func:`resolve_image` finds ``x.jpg`` stored as ``x.JPG``, ``x.jpeg``, ``x.png``, ...
"""

from __future__ import annotations

import codecs
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

_BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class AnnotationDecodeError(ValueError):
    """An annotation file could not be decoded or parsed (the message names the file)."""


def bom_encoding(data: bytes) -> str | None:
    """The encoding a byte-order mark at the start of ``data`` announces, or ``None``."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            return name
    return None


def decode_text(data: bytes, path: str | Path, encodings: Sequence[str] = ("utf-8",)) -> tuple[str, str]:
    """``(text, encoding)``: a BOM wins; else the first of ``encodings`` that decodes ``data`` strictly.

    Raises :class:`AnnotationDecodeError` naming ``path``, every encoding tried and where the first
    one failed (byte offset, line).
    """
    bom = bom_encoding(data)
    if bom is not None:
        try:
            return data.decode(bom), bom
        except UnicodeDecodeError as exc:
            raise AnnotationDecodeError(
                f"{path}: starts with a {bom} byte-order mark but is not valid {bom} ({exc.reason} at byte {exc.start})"
            ) from None
    first: UnicodeDecodeError | None = None
    for enc in encodings:
        try:
            return data.decode(enc), enc
        except UnicodeDecodeError as exc:
            first = first or exc
    assert first is not None
    line = data.count(b"\n", 0, first.start) + 1
    raise AnnotationDecodeError(
        f"{path}: cannot decode as {' or '.join(encodings)} (first failure: {first.encoding} {first.reason} at "
        f"byte {first.start}, line {line}, byte 0x{data[first.start]:02x})"
    )


def read_json(path: str | Path, encodings: Sequence[str] = ("utf-8",), what: str = "JSON file") -> tuple[Any, str]:
    """Parse the JSON file ``path``; returns ``(data, encoding)``. Errors name file, line and column."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    text, enc = decode_text(data, path, encodings)
    try:
        return json.loads(text), enc
    except json.JSONDecodeError as exc:
        raise AnnotationDecodeError(
            f"{path}: invalid JSON in {what}: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


def iter_jsonl(path: str | Path, encodings: Sequence[str] = ("utf-8",)) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_no, object)`` for each non-blank line of a JSONL file.

    Lines end at ``\\n`` (a trailing ``\\r`` is part of the CRLF ending, not of the record); a UTF-8
    BOM at the start is skipped; UTF-16/32 files are recognised by their BOM. Other Unicode line
    separators (U+2028, NEL) inside strings do NOT split records. Undecodable bytes and invalid JSON
    raise :class:`AnnotationDecodeError` naming ``path:line``.
    """
    path = Path(path)
    data = path.read_bytes()
    bom = bom_encoding(data)
    if bom is not None and bom != "utf-8-sig":  # wide encodings: decode the whole file first
        text, _ = decode_text(data, path, encodings)
        lines: Sequence[bytes | str] = text.split("\n")
    else:
        if bom == "utf-8-sig":
            data = data[len(codecs.BOM_UTF8):]
        lines = data.split(b"\n")
    for line_no, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            if not raw.strip():
                continue
            line = _decode_line(raw, path, line_no, encodings)
        else:
            line = raw
            if not line.strip():
                continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as exc:
            raise AnnotationDecodeError(f"{path}:{line_no}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def _decode_line(raw: bytes, path: Path, line_no: int, encodings: Sequence[str]) -> str:
    first: UnicodeDecodeError | None = None
    for enc in encodings:
        try:
            return raw.decode(enc)
        except UnicodeDecodeError as exc:
            first = first or exc
    assert first is not None
    raise AnnotationDecodeError(
        f"{path}:{line_no}: cannot decode line as {' or '.join(encodings)} ({first.reason} at column "
        f"{first.start + 1}, byte 0x{raw[first.start]:02x})"
    )


# ----------------------------------------------------------------------------- images


def resolve_image(path: str | Path) -> Path:
    """``path`` if it is a file; else the one image in its folder whose name matches ignoring letter
    case, or whose stem matches (ignoring case) with another image extension (``.JPG``, ``.jpeg``,
    ``.png``, ...). Returns ``path`` unchanged when nothing (or more than one file) matches, so the
    caller's "image not found" error names the expected path; an ambiguous match raises.
    """
    path = Path(path)
    if path.is_file():
        return path
    folder = path.parent
    try:
        mtime = folder.stat().st_mtime_ns
    except OSError:
        return path
    by_name, by_stem = _listing(str(folder), mtime)
    exact = by_name.get(path.name.lower())
    if exact is not None and len(exact) == 1:
        return folder / exact[0]
    if path.suffix.lower() not in IMAGE_EXTENSIONS and path.suffix:
        return path
    stem = (path.stem if path.suffix else path.name).lower()
    matches = by_stem.get(stem, ())
    if len(matches) == 1:
        return folder / matches[0]
    if len(matches) > 1:
        raise FileNotFoundError(
            f"image not found: {path}; several candidates with another extension or case: "
            + ", ".join(sorted(matches))
        )
    return path


@lru_cache(maxsize=16)
def _listing(folder: str, mtime_ns: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Names in ``folder`` indexed by lower-cased name and, for images, by lower-cased stem (cached
    per folder modification time, so one listing serves a whole split)."""
    by_name: dict[str, list[str]] = {}
    by_stem: dict[str, list[str]] = {}
    with os.scandir(folder) as it:
        for entry in it:
            name = entry.name
            by_name.setdefault(name.lower(), []).append(name)
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS:
                by_stem.setdefault(stem.lower(), []).append(name)
    return by_name, by_stem
