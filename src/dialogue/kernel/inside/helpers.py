"""Runs inside every kernel as the private module `_dialogue_kernel` (never in the user's
namespace): what the app's silent calls use.

`Raw` makes a string display as itself, so `Kernel.call` gets text back verbatim instead of a
repr that would have to be parsed. Standard library only: the kernel may run another Python.
"""
import subprocess as _subprocess


class Raw(str):
    def __repr__(self):
        return str(self)

    def _repr_pretty_(self, p, cycle):
        p.text(str(self))


def shell(cmd, timeout, limit):
    """Output (stdout and stderr interleaved) of a shell command, cut to `limit` characters,
    with a line saying how it ended when it did not end well. For !`cmd` references."""
    try:
        r = _subprocess.run(cmd, shell=True, stdin=_subprocess.DEVNULL, stdout=_subprocess.PIPE,
                            stderr=_subprocess.STDOUT, timeout=timeout)
    except _subprocess.TimeoutExpired as e:
        out = (e.output or b"").decode(errors="replace")
        return Raw(out[:limit] + f"\n[command timed out after {timeout} s]")
    out = r.stdout.decode(errors="replace")
    if len(out) > limit:
        out = out[:limit] + f"\n[output cut: {len(out) - limit:,} more characters]"
    if r.returncode:
        out += ("" if out.endswith("\n") or not out else "\n") + f"[exit status {r.returncode}]"
    return Raw(out)
