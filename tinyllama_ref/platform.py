"""The operating system's facilities that are not POSIX, in one place: what each does on Linux and elsewhere.

Every /proc read, posix_fadvise, madvise flag, O_DIRECT and arch_prctl of the package goes through a function
here. Each says its Linux behaviour (the same calls the code made before this module existed, so the figures
measured on Linux do not move) and its fallback: macOS's own call where one does the job (F_NOCACHE instead of
O_DIRECT and posix_fadvise, sysctl and getrusage for memory), else a no-op or None, which the caller already
handles.

    facility          Linux                                   macOS                        elsewhere
    current_rss       /proc/self/status VmRSS                 task_info resident_size      getrusage peak
    peak_rss          /proc/self/status VmHWM                 getrusage ru_maxrss          getrusage ru_maxrss
    available_memory  /proc/meminfo MemAvailable              sysctl hw.memsize (total)    sysconf pages
    busy_cpu_seconds  /proc/stat                              None (threads.py probes)     None
    io_read_bytes     /proc/self/io read_bytes                None (not reported)          None
    drop_cached       posix_fadvise(POSIX_FADV_DONTNEED)      fcntl F_NOCACHE              no-op
    release_pages     madvise(MADV_DONTNEED)                  madvise(MADV_DONTNEED)       no-op
    populate          madvise(MADV_POPULATE_READ), 5.14+      False (the caller preads)    False
    open_uncached     open(O_DIRECT)                          open + fcntl F_NOCACHE       refused
    cpu_flags         /proc/cpuinfo flags (x86-64 only)       empty                        empty
    mapped_files      /proc/self/maps                         empty                        empty
    request_amx_tiles arch_prctl(ARCH_REQ_XCOMP_PERM) x86-64  False                        False

The tests (tests/test_platform.py) take each Linux facility away in turn (PROC pointed at a missing folder,
os.posix_fadvise, os.O_DIRECT or mmap's MADV_* deleted) and run streaming, the memory budget, the thread
chooser and the benchmark through the fallbacks.
"""

import ctypes
import ctypes.util
import functools
import mmap
import os
import platform as _stdlib_platform
import sys

PROC = "/proc"                   # tests point this at a missing folder to stand for a system without /proc
MADV_POPULATE_READ = 22          # Linux 5.14+ (include/uapi/asm-generic/mman-common.h); not in Python's mmap
_ARCH_REQ_XCOMP_PERM = 0x1023    # arch/x86/include/uapi/asm/prctl.h
_XFEATURE_XTILEDATA = 18         # AMX tile data: the state a process must ask for before its first tile op
_SYS_ARCH_PRCTL = 158            # the x86-64 syscall number; on aarch64 158 is another call (getgroups)


def _proc(*parts):
    return os.path.join(PROC, *parts)


def _proc_field(path, field):
    """The integer after `field:` in a /proc file of "name: value [kB]" lines, or None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine():
    """The CPU architecture this Python runs on: "x86_64", "aarch64", "arm64" (macOS), ... Under qemu-user this
    is the emulated one, while /proc/cpuinfo may still describe the host's CPU: ask this first."""
    return _stdlib_platform.machine().lower()


def is_x86_64():
    return machine() in ("x86_64", "amd64")


# -- memory ---------------------------------------------------------------------------------------------------

def _maxrss():
    """getrusage's peak resident size in bytes (kB on Linux and the BSDs, bytes on macOS), or 0."""
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError, AttributeError):
        return 0
    return peak if sys.platform == "darwin" else peak * 1024


def _mach_resident_bytes():
    """macOS: this task's resident bytes (task_info MACH_TASK_BASIC_INFO, <mach/task_info.h>), or None."""
    class Info(ctypes.Structure):
        _pack_ = 4
        _fields_ = [("virtual_size", ctypes.c_uint64), ("resident_size", ctypes.c_uint64),
                    ("resident_size_max", ctypes.c_uint64), ("user_time", ctypes.c_int32 * 2),
                    ("system_time", ctypes.c_int32 * 2), ("policy", ctypes.c_int32),
                    ("suspend_count", ctypes.c_int32)]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        task = ctypes.c_uint32.in_dll(libc, "mach_task_self_")
        info, count = Info(), ctypes.c_uint32(ctypes.sizeof(Info) // 4)
        if libc.task_info(task, 20, ctypes.byref(info), ctypes.byref(count)) != 0:   # 20: MACH_TASK_BASIC_INFO
            return None
        return int(info.resident_size)
    except (OSError, AttributeError, ValueError):
        return None


def current_rss():
    """Resident bytes of this process now (anonymous memory plus the mapped file pages it holds).

    Linux: /proc/self/status VmRSS. macOS: task_info's resident_size. Elsewhere: getrusage's peak, an upper
    bound (a budget planned on it keeps fewer layers resident, never too many); 0 where even that is missing.
    """
    kb = _proc_field(_proc("self", "status"), "VmRSS")
    if kb is not None:
        return kb * 1024
    if sys.platform == "darwin":
        rss = _mach_resident_bytes()
        if rss is not None:
            return rss
    return _maxrss()


def peak_rss():
    """The high-water mark of this process's resident bytes. Linux: /proc/self/status VmHWM. Elsewhere:
    getrusage ru_maxrss (bytes on macOS, kB on the BSDs); 0 where neither exists."""
    kb = _proc_field(_proc("self", "status"), "VmHWM")
    return kb * 1024 if kb is not None else _maxrss()


def _sysctl_int(name):
    """macOS/BSD: an integer sysctl by name (sysctlbyname), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        value, size = ctypes.c_uint64(0), ctypes.c_size_t(8)
        if libc.sysctlbyname(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
            return None
        return int(value.value)
    except (OSError, AttributeError, TypeError):
        return None


def _sysconf_bytes(pages_name):
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf(pages_name)
    except (ValueError, OSError, AttributeError):
        return None


def available_memory():
    """Bytes the kernel can give a new process without swapping.

    Linux: /proc/meminfo MemAvailable (else, as before, free pages from sysconf SC_AVPHYS_PAGES). macOS has no
    such figure: sysctl hw.memsize, the physical memory, as the OS compresses and pages out idle memory
    before swapping. Elsewhere: sysconf's free pages, else its physical pages; 0 where nothing answers.
    """
    kb = _proc_field(_proc("meminfo"), "MemAvailable")
    if kb:
        return kb * 1024
    for value in (_sysconf_bytes("SC_AVPHYS_PAGES"),
                  _sysctl_int("hw.memsize") if sys.platform == "darwin" else None,
                  _sysconf_bytes("SC_PHYS_PAGES")):
        if value:
            return value
    return 0


# -- CPU time and I/O, for the thread chooser and the benchmark -------------------------------------------------

def busy_cpu_seconds():
    """Seconds of busy CPU time over all cores since boot (everything but idle and iowait), or None.

    Linux: the first line of /proc/stat, in clock ticks (sysconf SC_CLK_TCK). Elsewhere None: threads.py then
    measures passes with one and with all threads instead of looking at what other processes use."""
    try:
        with open(_proc("stat")) as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)            # idle + iowait
    return (sum(fields[:8]) - idle) / hz


def io_read_bytes():
    """Bytes this process has had read from the block device (not from the page cache), or None.

    Linux: /proc/self/io read_bytes. Elsewhere None (macOS's getrusage counts blocks, not bytes): the
    benchmark then reports the disk bytes per pass as unknown."""
    return _proc_field(_proc("self", "io"), "read_bytes")


# -- page cache and mappings: the streamer's hints ------------------------------------------------------------

def drop_cached(fd, offset, length):
    """Ask the OS not to keep a file range in its page cache (the next reader goes to the disk).

    Linux: posix_fadvise(POSIX_FADV_DONTNEED), which drops the range's clean pages that nobody maps. macOS has
    no posix_fadvise: fcntl F_NOCACHE on the descriptor, so what is read through it from now on is not
    cached (pages cached already stay). Elsewhere a no-op."""
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is not None and hasattr(os, "POSIX_FADV_DONTNEED"):
        fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        return
    _no_cache(fd)


def _no_cache(fd):
    """macOS: F_NOCACHE on fd (True), where fcntl has it; False elsewhere."""
    try:
        import fcntl
    except ImportError:
        return False
    flag = getattr(fcntl, "F_NOCACHE", None)
    if flag is None:
        return False
    try:
        fcntl.fcntl(fd, flag, 1)
    except OSError:
        return False
    return True


def release_pages(mapping, offset, length):
    """Drop a page-aligned range of a memory map from this process's resident memory.

    Linux: madvise(MADV_DONTNEED) (the file's pages stay in the page cache, unmapped from us); macOS has the
    same flag, a weaker hint there. A no-op where mmap has no madvise or no MADV_DONTNEED."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or not hasattr(mapping, "madvise"):
        return
    mapping.madvise(advice, offset, length)


@functools.lru_cache(maxsize=None)
def _libc_madvise():
    """libc's madvise through ctypes (which drops the GIL around the call), or None where there is none."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def populate(address, length):
    """Read a page-aligned range of a mapping from disk and map it into this process in one call; True if
    done.

    Linux 5.14+: madvise(MADV_POPULATE_READ) through ctypes, so the calling (read-ahead) thread waits for
    the disk without the GIL. Older Linux refuses it (False). Other systems have no such flag: False at
    once, and the caller reads the range with pread instead."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    fn = _libc_madvise()
    if fn is None:
        return False
    return fn(ctypes.c_void_p(address), ctypes.c_size_t(length), MADV_POPULATE_READ) == 0


def uncached_io():
    """None where open_uncached can work, else why it cannot (a sentence for the user).

    Linux: os.O_DIRECT. macOS: fcntl F_NOCACHE. Neither: refused, and streaming reads through the map."""
    if hasattr(os, "O_DIRECT"):
        return None
    try:
        import fcntl
        if hasattr(fcntl, "F_NOCACHE"):
            return None
    except ImportError:
        pass
    return "this OS has no O_DIRECT (nor F_NOCACHE)"


def open_uncached(path):
    """A read-only descriptor whose reads go from the disk into the caller's buffer, bypassing the page cache.

    Linux: os.open(O_RDONLY | O_DIRECT) (offsets, lengths and buffer addresses must then be aligned: 4096).
    macOS: os.open, then fcntl F_NOCACHE (no alignment needed; aligned reads are the fast ones). Raises
    OSError where neither exists (uncached_io says why) or the file system refuses."""
    if hasattr(os, "O_DIRECT"):
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    fd = os.open(path, os.O_RDONLY)
    if not _no_cache(fd):
        os.close(fd)
        raise OSError(uncached_io() or f"{path}: F_NOCACHE refused")
    return fd


# -- the CPU ----------------------------------------------------------------------------------------------------

def cpu_flags():
    """The CPU's feature flags as Linux lists them (/proc/cpuinfo "flags", x86 only), as a set.

    Empty on any other architecture, even where /proc/cpuinfo says more: under qemu-user emulation of aarch64
    it can be the x86 host's file, whose flags (avx512_vnni, amx_tile) this process cannot use. Empty on macOS
    (no /proc; its generic kernels need no flags)."""
    if not is_x86_64():
        return frozenset()
    try:
        with open(_proc("cpuinfo")) as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").partition(":")[2].split())
    except OSError:
        return frozenset()


def mapped_files():
    """Paths of the files mapped into this process (shared libraries among them). Linux: /proc/self/maps.
    Empty elsewhere (callers that look for a library there find none and do without)."""
    try:
        with open(_proc("self", "maps")) as f:
            return sorted({line.split()[-1] for line in f if len(line.split()) >= 6})
    except OSError:
        return []


def request_amx_tiles():
    """Ask for the AMX tile state; True if granted.

    Linux on x86-64 gives a process the AMX register state only on request: arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA), made through syscall(158) since glibc has no wrapper. False on any other system or
    architecture (the call does not exist there, and syscall 158 is something else on aarch64), and where
    Linux or the VM refuses."""
    if not sys.platform.startswith("linux") or not is_x86_64():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False
