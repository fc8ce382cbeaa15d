"""Build and install beam: the Python SDK plus the ``beam-worker`` binary.

``build_py`` also runs CMake on this tree and puts the binary in two places:
``<site-packages>/beam/bin/beam-worker`` (what ``beam serve`` runs) and, through
``data_files``, ``<prefix>/bin/beam-worker`` (on the venv's PATH). Both are the real ELF
binary. ``$BEAM_CMAKE_ARGS`` adds CMake arguments (e.g. ``-DBEAM_SANITIZE=address``),
``$BEAM_BUILD_JOBS`` sets the build parallelism (default 2).

Any Python works (Debian's, pyenv, conda, uv, a venv of any of them), but a worker runs
only the standard library of the libpython it embeds, and two builds of one version (say
Debian's 3.11.2 and pyenv's 3.11.7) are not interchangeable. So every install configures
its own CMake build directory, ``build/temp.*/cmake-<hash>`` keyed on the installing
interpreter, and names that interpreter's libpython explicitly, from its ``sysconfig``:
the shared library with an RPATH to its directory, or, for a Python built without one,
its static ``libpython*.a`` linked with ``--export-dynamic`` so extension modules find
the C API in the worker. Installing from one tree into venvs of different Pythons is
fine; the worker refuses to start with another Python's stdlib and says how to rebuild.
"""
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py
from setuptools.dist import Distribution

ROOT = os.path.dirname(os.path.abspath(__file__))
# Staging copy for data_files; relative to ROOT because setuptools wants relative paths.
STAGE_REL = os.path.join("build", "beam-worker-stage", "beam-worker")


def read_version():
    with open(os.path.join(ROOT, "python", "beam", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _copy_exec(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dst)


def interpreter_tag():
    """Short hash of what identifies the installing interpreter's build, so that another
    Python never reuses this one's CMake cache (FindPython caches the libpython path)."""
    ident = [os.path.realpath(sys.executable), sys.version,
             sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("LDLIBRARY") or ""]
    return hashlib.sha256("\0".join(ident).encode()).hexdigest()[:12]


def libpython():
    """``(library, extra link flags)`` of the running interpreter's own libpython.

    The shared library when it has one (LIBDIR; ``sys.base_prefix/lib`` for a build moved
    after configure), else the static archive (LIBPL) with the libraries it and its
    built-in modules need, ``--export-dynamic`` (extension modules resolve the C API
    against the executable) and ``-no-pie`` (archives such as Debian's are not PIC).
    """
    var = sysconfig.get_config_var
    dirs = [d for d in (var("LIBDIR"), os.path.join(sys.base_prefix, sys.platlibdir)) if d]
    shared = [n for n in (var("INSTSONAME"), var("LDLIBRARY")) if n and ".so" in n]
    for d in dirs:
        for name in shared:
            if os.path.isfile(os.path.join(d, name)):
                return os.path.join(d, name), ""
    for d in [var("LIBPL")] + dirs:
        if d and var("LIBRARY") and os.path.isfile(os.path.join(d, var("LIBRARY"))):
            flags = " ".join(f for f in (var("LIBS"), var("SYSLIBS"), var("MODLIBS")) if f)
            return os.path.join(d, var("LIBRARY")), f"-no-pie -Wl,--export-dynamic {flags}"
    sys.exit(f"beam: {sys.executable} has no libpython to embed (looked for "
             f"{shared + [var('LIBRARY')]} in {[var('LIBPL')] + dirs}); beam-worker needs a "
             "Python built with its development files")


class build_py(_build_py):
    """build_py + ``cmake --build --target beam-worker``."""

    def run(self):
        super().run()
        binary = self.build_worker()
        _copy_exec(binary, os.path.join(self.build_lib, "beam", "bin", "beam-worker"))
        _copy_exec(binary, os.path.join(ROOT, STAGE_REL))

    def build_worker(self):
        build_temp = os.path.abspath(self.get_finalized_command("build").build_temp)
        cmake_dir = os.path.join(build_temp, "cmake-" + interpreter_tag())
        library, link = libpython()
        configure = ["cmake", "-S", ROOT, "-B", cmake_dir, "-DCMAKE_BUILD_TYPE=Release",
                     f"-DPython3_EXECUTABLE={sys.executable}",
                     f"-DBEAM_PYTHON_LIBRARY={library}",
                     f"-DBEAM_PYTHON_INCLUDE={sysconfig.get_path('include')}",
                     f"-DBEAM_PYTHON_LINK={link}"]
        configure += shlex.split(os.environ.get("BEAM_CMAKE_ARGS", ""))
        jobs = os.environ.get("BEAM_BUILD_JOBS", "2")
        build = ["cmake", "--build", cmake_dir, "--target", "beam-worker", "-j", jobs]
        for cmd in (configure, build):
            self.announce("running " + " ".join(shlex.quote(c) for c in cmd), level=2)
            try:
                subprocess.run(cmd, check=True)
            except FileNotFoundError:
                sys.exit("beam: cmake not found; run scripts/install-deps.sh (or apt-get install cmake)")
            except subprocess.CalledProcessError as exc:
                sys.exit(f"beam: building beam-worker failed ({' '.join(cmd[:2])} exit {exc.returncode})")
        binary = os.path.join(cmake_dir, "beam-worker")
        if not os.path.isfile(binary):
            sys.exit(f"beam: cmake finished but {binary} does not exist")
        return binary


class BinaryDistribution(Distribution):
    """The wheel holds a native binary: tag it for this platform and Python."""

    def has_ext_modules(self):
        return True


setup(
    name="beam",
    version=read_version(),
    description="Serve @beam.endpoint functions from a CRIU-checkpointed worker",
    python_requires=">=3.9",
    package_dir={"": "python"},
    packages=["beam"],
    package_data={"beam": ["py.typed"]},
    install_requires=["msgpack>=1.0"],
    entry_points={"console_scripts": ["beam=beam.cli:main"]},
    data_files=[("bin", [STAGE_REL])],
    cmdclass={"build_py": build_py},
    distclass=BinaryDistribution,
    zip_safe=False,
)
