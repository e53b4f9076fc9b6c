"""Shared by the bench scripts: the machine line, the hypervisor's stolen CPU time and writing a markdown report."""
import os
import platform


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


def stolen_seconds(stat="/proc/stat"):
    """CPU seconds the hypervisor gave to other guests, summed over this machine's CPUs since boot (the steal
    column of /proc/stat's "cpu" line); None where there is no such file. On a virtual machine a run slowed
    by its host shows here, not in the load average."""
    try:
        with open(stat) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if fields[0] != "cpu" or len(fields) < 9:
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
