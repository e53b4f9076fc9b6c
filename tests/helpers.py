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


def call_main(module, *argv):
    """Run a script's build_parser() + main in-process, as its __main__ does: (exit code, stderr).

    Much faster than a subprocess for input-validation tests; the one-line contract is the same
    because both go through cli.run and cli.ArgumentParser.
    """
    import contextlib
    import io

    import cli
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            cli.run(module.main, module.build_parser().parse_args([str(a) for a in argv]))
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def assert_one_line_error(code, stderr, *fragments):
    """The in-process twin of assert_user_error."""
    class Proc:
        returncode = code
        stdout = ""
    Proc.stderr = stderr
    assert_user_error(Proc, *fragments)
