"""Small shared test utilities."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*argv, cwd=ROOT, env=None, timeout=600):
    """Run a repository script with this interpreter; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    full_env.update(env or {})
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(proc, *fragments):
    """Exit 2, exactly one stderr line starting 'error:', no traceback, naming the fragments."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
