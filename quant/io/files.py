"""The project's one atomic writer: a reader never sees a half-written file or directory.

Everything is written under a temporary sibling name ("<path>.tmp-<pid>[suffix]") and renamed into
place only when complete; on an error the temporary is removed. Used for checkpoints, the compiled
kernel library, sample shards and .npz batches, PNGs, JSON reports and tables.
"""
import contextlib
import json
import os
import shutil


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _umask():
    """The process's umask, read without changing it where Linux reports it (os.umask(0) would open a
    window in which another thread's new files get mode 0666)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _usual_mode(path):
    """Give what is published at least the permissions a plain open() would (writers such as safetensors'
    save_file create 0600 files): the umask's read/write bits added, nothing taken away."""
    umask = _umask()
    paths = [path]
    if os.path.isdir(path):
        paths += [os.path.join(d, f) for d, dirs, files in os.walk(path) for f in dirs + files]
    for p in paths:
        usual = (0o777 if os.path.isdir(p) else 0o666) & ~umask
        os.chmod(p, os.stat(p).st_mode & 0o7777 | usual)


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yield a temporary sibling of `path` to write (a file, or a directory to create); on success it gets
    the usual permissions and is renamed to `path`, on failure removed. suffix: for writers that go by
    the extension (".png")."""
    tmp = f"{path}.tmp-{os.getpid()}{suffix}"
    _remove(tmp)  # left by a killed run with the same pid
    try:
        yield tmp
        _usual_mode(tmp)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def atomic_write(path, write, mode="wb"):
    """write(file object) into a temporary sibling opened with `mode`, then rename it to path."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            write(f)


def write_json(path, obj, indent=1, sort_keys=False, end=""):
    """json.dumps(obj) + end, atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent, sort_keys=sort_keys) + end), mode="w")
