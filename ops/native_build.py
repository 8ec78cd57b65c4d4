"""Build the native kernel library ``libonnxvq_ops.so`` from ``ops/native`` (``onnxvq native build``).

The library holds C++ kernels of the ``ai.onnxvq`` ops; onnxruntime loads it with
``SessionOptions.register_custom_ops_library`` (see :mod:`onnxvq.ops.native_library`) and then
runs the kernels instead of the ops' function bodies. It is built on the machine that uses it
(``-march=native``), from the sources that ship with the package (``native/CMakeLists.txt`` and
``native/src/*.cc``), with CMake and Ninja.

onnxruntime's C/C++ headers are in no Python wheel. They are fetched once from the npm registry,
where the package ``com.github.asus4.onnxruntime`` (a Unity packaging of onnxruntime's official
builds) carries them, pinned by version and SHA-256 (:data:`ORT_HEADERS_URL`,
:data:`ORT_HEADERS_SHA256`); only the header folder is extracted, into the user's cache folder
(``$XDG_CACHE_HOME/onnxvq`` or ``~/.cache/onnxvq``), so later builds reuse it. ``ORT_INCLUDE_DIR``
(environment variable, or the ``ort_include`` argument) names a header folder to use instead, for
offline builds.

The compiled file is copied into place atomically (a process that has the old library mapped
keeps a valid file): by default into this package's ``native/lib/`` folder, where
:func:`onnxvq.ops.native_library.native_library_path` looks for it.

Example::

    >>> from onnxvq.ops.native_build import build
    >>> build()  # doctest: +SKIP
    PosixPath('.../onnxvq/ops/native/lib/libonnxvq_ops.so')
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from onnxvq.errors import OnnxVQError

__all__ = [
    "LIBRARY_NAME",
    "ORT_HEADERS_SHA256",
    "ORT_HEADERS_URL",
    "ORT_HEADERS_VERSION",
    "build",
    "cache_dir",
    "default_library_path",
    "fetch_headers",
    "headers_api_version",
    "ort_include_dir",
]

logger = logging.getLogger(__name__)

ORT_HEADERS_PACKAGE = "com.github.asus4.onnxruntime"
ORT_HEADERS_VERSION = "0.4.9"
ORT_HEADERS_URL = (
    f"https://registry.npmjs.org/{ORT_HEADERS_PACKAGE}/-/{ORT_HEADERS_PACKAGE}-{ORT_HEADERS_VERSION}.tgz"
)
ORT_HEADERS_SHA256 = "e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d"
# The folder of the tarball whose files are the headers (onnxruntime's C API version 29). Any
# platform's copy of the headers is the same text; the iOS framework's is a flat folder.
ORT_HEADERS_FOLDER = "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers/"
# The file a header folder must hold to be one.
_C_API_HEADER = "onnxruntime_c_api.h"

LIBRARY_NAME = "libonnxvq_ops.so"
SOURCE_DIR = Path(__file__).resolve().parent / "native"
_BUILD_COMMAND = "onnxvq native build"
_DOWNLOAD_TIMEOUT_S = 60
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """onnxvq's cache folder: ``$XDG_CACHE_HOME/onnxvq``, else ``~/.cache/onnxvq``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnxvq"


def default_library_path() -> Path:
    """Where :func:`build` puts the library by default: ``native/lib/`` in this package's folder
    (the checkout's ``ops/`` in an editable install, ``site-packages/onnxvq/ops`` otherwise)."""
    return SOURCE_DIR / "lib" / LIBRARY_NAME


def fetch_headers(cache: str | os.PathLike | None = None, *, echo: Callable[[str], None] | None = None) -> Path:
    """The folder of onnxruntime's C/C++ headers in the cache, downloaded on first use.

    Downloads :data:`ORT_HEADERS_URL` (about 150 MB) to a temporary file, checks its SHA-256
    against :data:`ORT_HEADERS_SHA256`, and extracts only the files of
    :data:`ORT_HEADERS_FOLDER` into ``<cache>/ort-headers-<version>/`` (renamed into place once
    complete, so an interrupted fetch leaves nothing that looks done). Raises
    :class:`OnnxVQError` when the download fails or the checksum differs.
    """
    root = Path(cache) if cache is not None else cache_dir()
    target = root / f"ort-headers-{ORT_HEADERS_VERSION}"
    if (target / _C_API_HEADER).is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OnnxVQError(f"cannot create the cache folder {root}: {e.strerror or e}") from None
    if echo:
        echo(f"fetching onnxruntime's headers ({ORT_HEADERS_PACKAGE} {ORT_HEADERS_VERSION}, about 150 MB) "
             f"from {ORT_HEADERS_URL}")
    with tempfile.TemporaryDirectory(prefix=".ort-headers-", dir=root) as work:
        tarball = Path(work) / "package.tgz"
        digest = _download(ORT_HEADERS_URL, tarball)
        if digest != ORT_HEADERS_SHA256:
            raise OnnxVQError(
                f"the download of {ORT_HEADERS_URL} has SHA-256 {digest}, not the pinned {ORT_HEADERS_SHA256}; "
                "it was discarded (retry, or set ORT_INCLUDE_DIR to a folder holding onnxruntime's headers)"
            )
        extracted = Path(work) / "headers"
        _extract_headers(tarball, extracted)
        try:
            os.replace(extracted, target)
        except OSError:
            if not (target / _C_API_HEADER).is_file():  # another build finished first: fine
                raise
    return target


def _download(url: str, path: Path) -> str:
    """Stream ``url`` into ``path``; the SHA-256 of what was written."""
    sha = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response, open(path, "wb") as out:
            while chunk := response.read(_CHUNK):
                sha.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise OnnxVQError(
            f"cannot download onnxruntime's headers from {url}: {reason}; "
            "set ORT_INCLUDE_DIR to a folder holding onnxruntime_c_api.h to build offline"
        ) from None
    return sha.hexdigest()


def _extract_headers(tarball: Path, out: Path) -> None:
    """The regular files directly in :data:`ORT_HEADERS_FOLDER`, written flat into ``out`` (names
    are taken from the member's last component only, so no member can write outside ``out``)."""
    out.mkdir()
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for member in archive:
                name = member.name.removeprefix("./")
                if not member.isfile() or not name.startswith(ORT_HEADERS_FOLDER):
                    continue
                rest = name[len(ORT_HEADERS_FOLDER):]
                if not rest or "/" in rest or rest in (".", ".."):
                    continue
                source = archive.extractfile(member)
                with source, open(out / rest, "wb") as f:
                    shutil.copyfileobj(source, f)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise OnnxVQError(f"cannot read the onnxruntime package {tarball}: {e}") from None
    if not (out / _C_API_HEADER).is_file():
        raise OnnxVQError(
            f"the onnxruntime package has no {ORT_HEADERS_FOLDER}{_C_API_HEADER}; "
            "set ORT_INCLUDE_DIR to a folder holding onnxruntime's headers"
        )


def ort_include_dir(override: str | os.PathLike | None = None, *, echo: Callable[[str], None] | None = None) -> Path:
    """The header folder to compile against: ``override``, else ``$ORT_INCLUDE_DIR``, else the
    cached download (:func:`fetch_headers`). A folder given without ``onnxruntime_c_api.h`` is an
    error."""
    given = override if override is not None else os.environ.get("ORT_INCLUDE_DIR") or None
    if given is None:
        return fetch_headers(echo=echo)
    folder = Path(given).expanduser().resolve()
    if not (folder / _C_API_HEADER).is_file():
        source = "--ort-include" if override is not None else "ORT_INCLUDE_DIR"
        raise OnnxVQError(f"{source} {given} holds no {_C_API_HEADER}; give the folder of onnxruntime's C/C++ headers")
    return folder


def headers_api_version(include_dir: str | os.PathLike) -> int | None:
    """``ORT_API_VERSION`` as the headers in ``include_dir`` define it (None when not found)."""
    try:
        text = (Path(include_dir) / _C_API_HEADER).read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"^#define ORT_API_VERSION (\d+)", text, re.M)
    return int(match.group(1)) if match else None


def _runtime_api_version() -> int | None:
    """The C API version of the installed onnxruntime: its minor version (1.22 serves API 22)."""
    try:
        from importlib.metadata import version

        major, minor = version("onnxruntime").split(".")[:2]
        return int(minor) if major == "1" else None
    except Exception:  # no metadata or an unusual version string: nothing to compare
        return None


def build(
    out: str | os.PathLike | None = None,
    *,
    ort_include: str | os.PathLike | None = None,
    build_dir: str | os.PathLike | None = None,
    echo: Callable[[str], None] | None = None,
) -> Path:
    """Compile ``libonnxvq_ops.so`` and copy it into ``out`` (a folder; default: the folder of
    :func:`default_library_path`). Returns the library's path.

    The build folder defaults to ``<cache>/build/<key>``, one per source folder and header
    folder, so a rebuild only compiles what changed. Raises :class:`OnnxVQError` with one line
    (and, for compile errors, the path of the full log) when CMake, Ninja or a compiler is
    missing, the headers cannot be fetched, or the build fails. ``echo`` receives progress lines.
    """
    if not sys.platform.startswith("linux"):
        raise OnnxVQError(f"the native library builds on Linux only (this is {sys.platform}); "
                          "compressed models run without it, through their function bodies")
    if not sorted(SOURCE_DIR.glob("src/*.cc")):
        raise OnnxVQError(f"no kernel sources in {SOURCE_DIR / 'src'}: this copy of onnxvq has no native kernels")
    cmake, ninja = _tool("cmake"), _tool("ninja")
    include = ort_include_dir(ort_include, echo=echo)
    api, runtime = headers_api_version(include), _runtime_api_version()
    if api is not None and runtime is not None and runtime < api:
        logger.warning("the installed onnxruntime serves C API version %d, older than the headers' %d: "
                       "the library will not load until onnxruntime is upgraded", runtime, api)
    key = hashlib.sha256(f"{SOURCE_DIR}\0{include}".encode()).hexdigest()[:16]
    work = Path(build_dir) if build_dir is not None else cache_dir() / "build" / key
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OnnxVQError(f"cannot create the build folder {work}: {e.strerror or e}") from None
    log = work / "build.log"
    configure = [cmake, "-S", str(SOURCE_DIR), "-B", str(work), "-G", "Ninja",
                 f"-DCMAKE_MAKE_PROGRAM={ninja}", f"-DORT_INCLUDE_DIR={include}", "-DCMAKE_BUILD_TYPE=Release"]
    if echo:
        echo(f"building {LIBRARY_NAME} in {work} (headers: {include}, API version {api})")
    with open(log, "w", encoding="utf-8") as f:
        for command in (configure, [cmake, "--build", str(work)]):
            f.write("$ " + " ".join(command) + "\n")
            f.flush()
            done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                f.close()
                raise OnnxVQError(f"the native build failed: {_first_error(log)} (full log: {log})")
    built = work / LIBRARY_NAME
    if not built.is_file():
        raise OnnxVQError(f"the native build wrote no {built} (full log: {log})")
    target = Path(out) / LIBRARY_NAME if out is not None else default_library_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OnnxVQError(f"cannot create {target.parent}: {e.strerror or e}") from None
    from onnxvq.model_io import write_atomically

    # A copy renamed into place, never a write into the old file: a running process that has the
    # old library mapped would crash on its pages changing under it.
    write_atomically(target, lambda tmp: shutil.copyfile(built, tmp))
    return target


def _tool(name: str) -> str:
    """The path of a build tool: on PATH, or beside this Python (a venv's ``pip install cmake
    ninja`` puts them there, and a venv need not be activated to be used)."""
    found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if found is None:
        package = {"ninja": "ninja-build"}.get(name, name)
        raise OnnxVQError(f"{name} not found: install it (apt-get install {package}, or pip install {name}) "
                          f"and rerun `{_BUILD_COMMAND}`")
    return found


def _first_error(log: Path) -> str:
    """The line of a build log that says what went wrong: a compiler or linker error, or the
    message of a ``CMake Error``; else the log's last line."""
    lines = [line.rstrip() for line in log.read_text(errors="replace").splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("CMake Error"):
            message = next((l.strip() for l in lines[i + 1:] if l.strip()), "")
            return f"{line.rstrip(':')}: {message}" if message else line
        if re.search(r"\b(error|undefined reference)\b", line) and not line.startswith(("ninja:", "FAILED:")):
            return line.strip()
    return next((l.strip() for l in reversed(lines) if l.strip()), "no output")
