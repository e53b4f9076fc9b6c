"""Shared by the bench scripts: the machine line, the hypervisor's stolen CPU time and writing a markdown report."""
import os
import platform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: scripts run from here
RESULTS = os.path.join(ROOT, "bench", "results")


def cpu_name():
    """The CPU model from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def stolen_seconds(stat="/proc/stat", cpu="cpu"):
    """CPU seconds the hypervisor gave to other guests since boot: the steal column of /proc/stat's line
    `cpu` ("cpu": summed over this machine's CPUs; "cpu0", "cpu1", ...: one of them); None where there is no
    such file or line. On a virtual machine a run slowed by its host shows here, not in the load average."""
    try:
        with open(stat) as f:
            lines = [line.split() for line in f]
    except OSError:
        return None
    fields = next((f for f in lines if f and f[0] == cpu), None)
    if fields is None or len(fields) < 9:
        return None
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def stolen_share(since, wall_s):
    """The share of all CPUs' time over the last wall_s seconds that the host stole, from stolen_seconds() taken
    at their start (None if that was None)."""
    return None if since is None else (stolen_seconds() - since) / (wall_s * os.cpu_count())


def write_report(path, lines):
    """Write the markdown lines to path (creating its directory) and echo them."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
