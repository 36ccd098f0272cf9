"""Make the Debian Reference PDF available and print its path.

The evaluation set ``eval/debian-reference.jsonl`` was labelled on the PDF
shipped by the Debian package ``debian-reference-en``.  If the package is
installed, its file is used as is.  Otherwise the ``.deb`` is fetched
without root (``apt-get download``) into a cache directory and unpacked with
``dpkg-deb -x``.

Page numbers in the set are physical page indexes, so a different build of
the PDF can move them: the file's SHA-256 is compared with the one the set
was labelled on and a mismatch is reported as a warning, not an error.

Usage::

    python eval/fetch_docs.py [--cache-dir DIR] [--no-system]

The PDF path is the only thing written to standard output; messages go to
standard error.  Exit status 1 if the document cannot be made available.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

PACKAGE = "debian-reference-en"
PDF_NAME = "debian-reference.en.pdf"
PDF_IN_PACKAGE = Path("usr/share/debian-reference") / PDF_NAME
SYSTEM_PDF = Path("/") / PDF_IN_PACKAGE

# The build the set was labelled on: debian-reference-en 2.100 (Debian 12
# bookworm), 261 pages.
LABELLED_VERSION = "2.100"
LABELLED_SHA256 = "32775deeca0770ac25282b0c894cbaae83f4dd4ab00e891b94e8f009c0366728"

DEFAULT_CACHE_DIR = Path(__file__).resolve().parent / ".docs"


class FetchError(Exception):
    """The document could not be found, downloaded or unpacked."""


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run(command: list[str], cwd: Path) -> None:
    try:
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise FetchError(f"{command[0]} is not available on this system") from exc
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()
        last = detail[-1] if detail else f"exit status {exc.returncode}"
        raise FetchError(f"{' '.join(command)} failed: {last}") from exc


def fetch_into(cache_dir: Path) -> Path:
    """Download and unpack the package under ``cache_dir``; return the PDF path.

    A PDF already unpacked there is reused without touching the network.
    """
    unpacked = cache_dir / "root"
    pdf = unpacked / PDF_IN_PACKAGE
    if pdf.is_file():
        return pdf
    cache_dir.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", PACKAGE], cwd=cache_dir)
    debs = sorted(cache_dir.glob(f"{PACKAGE}_*.deb"), key=lambda p: p.stat().st_mtime)
    if not debs:
        raise FetchError(f"apt-get download left no {PACKAGE}_*.deb in {cache_dir}")
    _run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], cwd=cache_dir)
    if not pdf.is_file():
        raise FetchError(f"{debs[-1].name} does not contain {PDF_IN_PACKAGE}")
    return pdf


def locate_pdf(cache_dir: Path, use_system: bool = True) -> Path:
    """The installed PDF if there is one, else the one fetched into ``cache_dir``."""
    if use_system and SYSTEM_PDF.is_file():
        return SYSTEM_PDF
    return fetch_into(cache_dir)


def check_digest(pdf: Path) -> bool:
    """Warn on standard error if ``pdf`` is not the build the set was labelled on."""
    actual = sha256_of(pdf)
    if actual == LABELLED_SHA256:
        return True
    sys.stderr.write(
        f"warning: {pdf} has sha256 {actual}, but the evaluation set was labelled on "
        f"{PACKAGE} {LABELLED_VERSION} (sha256 {LABELLED_SHA256}); "
        "page numbers may have moved, so retrieval scores may be off\n"
    )
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        help=f"where the .deb is downloaded and unpacked (default: {DEFAULT_CACHE_DIR})",
    )
    parser.add_argument(
        "--no-system",
        action="store_true",
        help=f"ignore {SYSTEM_PDF} and always use the cache directory",
    )
    args = parser.parse_args(argv)
    try:
        pdf = locate_pdf(args.cache_dir, use_system=not args.no_system)
    except FetchError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    check_digest(pdf)
    sys.stdout.write(f"{pdf}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
