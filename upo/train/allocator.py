"""The process's memory allocator: tcmalloc or jemalloc, preloaded by re-executing the process in place.

glibc's malloc keeps freed heap that a long training step's tensors leave behind, and ``top`` and the
out-of-memory killer count it: on SmolLM2 at L = 1024 it held 1.8 GB beyond 0.66 GB of live tensors
(docs/training.md#the-memory-allocator). PyTorch's CPU tuning guide recommends tcmalloc or jemalloc; no pip
package ships them, the system's package manager (or conda) does. A library only takes over ``malloc`` if
it is loaded before everything else, so :func:`use_allocator` sets ``LD_PRELOAD`` and replaces the process
with itself (``os.execve``: the same PID, so torchrun's agent and the signals a user or scheduler sends keep
reaching the training process, and its exit status is the command's), as ``torch.backends.xeon.run_cpu``
sets ``LD_PRELOAD`` for the process it launches. The libraries are searched where that launcher searches,
plus the multiarch folders where Debian and Ubuntu packages put them (only a -dev package adds the
unversioned ``libtcmalloc.so`` the launcher looks for).

Settings: ``--allocator auto|system|tcmalloc|jemalloc`` (or the config file's ``allocator``), else
``UPO_ALLOCATOR``, else ``auto`` (tcmalloc, then jemalloc, on CPU runs); ``UPO_ALLOCATOR_PATH`` (folders
separated by ``:``) replaces the folders searched.
"""
from __future__ import annotations

import glob
import os
import platform
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from upo.train.errors import UserError

LIBRARIES = ("tcmalloc", "jemalloc")
CHOICES = ("auto", "system", *LIBRARIES)
CHOICE_ENV = "UPO_ALLOCATOR"
PATH_ENV = "UPO_ALLOCATOR_PATH"
# Set in the re-executed process: the library it was started with (so a preload that failed is said once, not
# retried forever). Removed as soon as it is read.
PRELOADED_ENV = "UPO_ALLOCATOR_PRELOADED"
# File names, most specific first; the _debug builds of gperftools are not matched.
PATTERNS = {"tcmalloc": ("libtcmalloc.so", "libtcmalloc.so.[0-9]*", "libtcmalloc_minimal.so",
                         "libtcmalloc_minimal.so.[0-9]*"),
            "jemalloc": ("libjemalloc.so", "libjemalloc.so.[0-9]*")}
INSTALL = {"tcmalloc": ("libtcmalloc-minimal4", "gperftools"), "jemalloc": ("libjemalloc2", "jemalloc")}
INSTALL_HINT = ("install one with `apt-get install libtcmalloc-minimal4` (or libjemalloc2; conda: "
                "`conda install -c conda-forge gperftools` or jemalloc)")
# jemalloc as torch.backends.xeon.run_cpu configures it (a user's MALLOC_CONF wins).
JEMALLOC_CONF = "oversize_threshold:1,background_thread:true,metadata_thp:auto"
# gperftools writes a line with a stack for every allocation above 1 GiB by default (a 7B model's weights).
TCMALLOC_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


@dataclass(frozen=True)
class Allocator:
    """The allocator of this process: ``name`` tcmalloc, jemalloc or system; ``path`` its library."""

    name: str
    path: str | None = None

    def describe(self) -> str:
        if self.path is None:
            libc, version = platform.libc_ver()
            return f"{libc or 'the C library'} {version} malloc".replace("  ", " ").strip()
        return f"{self.name} ({os.path.basename(self.path)})"


def search_dirs() -> list[str]:
    """Where the libraries are looked for: ``UPO_ALLOCATOR_PATH``, else conda's and the virtualenv's lib, the
    user's, /usr/local, the multiarch folders and /usr/lib."""
    if os.environ.get(PATH_ENV):
        return [d for d in os.environ[PATH_ENV].split(os.pathsep) if d]
    dirs = [f"{os.environ[v]}/lib" for v in ("CONDA_PREFIX", "VIRTUAL_ENV") if os.environ.get(v)]
    dirs += [f"{sys.prefix}/lib", os.path.expanduser("~/.local/lib"), "/usr/local/lib", "/usr/local/lib64"]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    arch_dirs = [f"{root}/{multiarch}" for root in ("/usr/lib", "/lib")] if multiarch else \
        sorted(glob.glob("/usr/lib/*-linux-gnu*"))
    return list(dict.fromkeys([*dirs, *arch_dirs, "/usr/lib", "/usr/lib64"]))


def find_library(name: str, dirs: list[str] | None = None) -> str | None:
    """The first file of allocator ``name`` in the search folders, or None."""
    for folder in search_dirs() if dirs is None else dirs:
        for pattern in PATTERNS[name]:
            matches = sorted(m for m in glob.glob(os.path.join(glob.escape(folder), pattern)) if os.path.isfile(m))
            if matches:
                return matches[0]
    return None


def _kind(path: str) -> str | None:
    """tcmalloc or jemalloc for a path to one of their libraries, else None."""
    base = os.path.basename(path)
    return next((name for name in LIBRARIES if base.startswith(f"lib{name}")), None)


def _mapped_libraries() -> list[str]:
    """The files mapped into this process (Linux), in order."""
    try:
        with open("/proc/self/maps") as maps:
            fields = [line.split(None, 5) for line in maps]
    except OSError:
        return []
    return list(dict.fromkeys(f[5].strip() for f in fields if len(f) == 6 and f[5].startswith("/")))


def allocator_in_use() -> Allocator:
    """The allocator this process runs on: the first tcmalloc or jemalloc of ``LD_PRELOAD`` that is loaded (the
    first preloaded ``malloc`` is the one every library calls), else one loaded some other way, else the system's."""
    mapped = _mapped_libraries()
    real = {os.path.realpath(path): path for path in mapped}
    for entry in os.environ.get("LD_PRELOAD", "").replace(" ", ":").split(":"):
        if entry and _kind(entry) and os.path.realpath(entry) in real:
            return Allocator(_kind(entry), real[os.path.realpath(entry)])
    loaded = [path for path in mapped if _kind(path)]
    return Allocator(_kind(loaded[0]), loaded[0]) if loaded else Allocator("system")


def requested_choice(setting: str | None) -> str:
    """``--allocator`` (flag or config file), else ``UPO_ALLOCATOR``, else auto."""
    if setting is not None:
        return setting
    value = os.environ.get(CHOICE_ENV, "").strip().lower() or "auto"
    if value not in CHOICES:
        raise UserError(f"{CHOICE_ENV}={os.environ[CHOICE_ENV]}: use one of {', '.join(CHOICES)}")
    return value


def runs_on_cpu(device: str) -> bool:
    """Whether ``--device`` (auto, cpu, cuda[:N]) puts the run on the CPU."""
    if device == "auto":
        import torch  # already loaded by upo's import; not at the top, so that this module stays light

        return not torch.cuda.is_available()
    return device.startswith("cpu")


def preload_environment(name: str, library: str, environ: dict | None = None) -> dict:
    """``environ`` (default: this process's) with ``library`` first in ``LD_PRELOAD`` (other allocators removed,
    the rest kept) and the library's quiet, recommended settings unless the user set them."""
    env = dict(os.environ if environ is None else environ)
    kept = [entry for entry in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if entry and not _kind(entry)]
    env["LD_PRELOAD"] = ":".join([library, *kept])
    extra = {"MALLOC_CONF": JEMALLOC_CONF} if name == "jemalloc" else dict(TCMALLOC_QUIET)
    for key, value in extra.items():
        env.setdefault(key, value)
    return env


def use_allocator(setting: str | None, on_cpu: bool, execve=os.execve) -> tuple[Allocator, str | None]:
    """Make this process run on the allocator asked for: re-execute it with the library preloaded (does not
    return) or return the allocator in use and, when ``auto`` found none, the one line to tell the user.

    ``setting``: ``--allocator`` as given (None: ``UPO_ALLOCATOR``, else auto); ``on_cpu``: the run's device
    is the CPU (``auto`` leaves a GPU run's host allocator alone). A named library that cannot be found or
    preloaded is a :class:`UserError`. Only for a process started as a command (``sys.orig_argv``).
    """
    choice = requested_choice(setting)
    tried = os.environ.pop(PRELOADED_ENV, None)
    current = allocator_in_use()
    if choice == "system" or (choice == "auto" and not on_cpu):
        return current, None
    if current.name == choice or (choice == "auto" and current.name != "system"):
        return current, None
    if tried is not None:  # this is the re-executed process and the library is not there: ld.so said why above
        if choice != "auto":
            raise UserError(f"--allocator {choice}: {tried} could not be preloaded (see the ld.so message above)")
        return current, (f"note: {tried} could not be preloaded (see ld.so's message above); going on with "
                         f"{current.describe()}")
    if not sys.platform.startswith("linux"):
        if choice != "auto":
            raise UserError(f"--allocator {choice}: preloading an allocator needs Linux; use --allocator system")
        return current, None
    if not sys.orig_argv:  # an embedded interpreter: no command line to run again
        return current, None
    names = LIBRARIES if choice == "auto" else (choice,)
    found = next(((name, path) for name in names if (path := find_library(name))), None)
    if found is None:
        if choice != "auto":
            apt, conda = INSTALL[choice]
            raise UserError(f"--allocator {choice}: no lib{choice} in {':'.join(search_dirs())}; install it with "
                            f"`apt-get install {apt}` (conda: `conda install -c conda-forge {conda}`), or use "
                            "--allocator auto")
        return current, ("note: no tcmalloc or jemalloc on this system, so glibc's malloc keeps memory that steps "
                         f"free (docs/training.md#the-memory-allocator); {INSTALL_HINT}; or pass --allocator system")
    name, path = found
    env = preload_environment(name, path)
    env[PRELOADED_ENV] = path
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, sys.orig_argv, env)
    raise AssertionError("os.execve returned")  # only a test's stand-in returns
