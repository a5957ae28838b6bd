"""What a chatty or progress-bar cell costs on the way to the store and the page.

No kernel: the IOPub messages a kernel would send are fed to `OutputCap` (what the kernel does)
and folded as the run state does, and the page's updates are rendered as the cell's event
stream renders them. Two cells:

- progress: 5,000 tqdm-like redraws (`\\r` + a 60-character bar), then a newline;
- chatty: 3,000 messages of 5 lines each (100 characters a line, some coloured), as a training
  loop's prints arrive (ipykernel sends what was printed every 0.2 s).

For each: the time to fold every message (the kernel's cap and the run state; baseline in the
same run: appending the chunks to a list, what folding did before stream chunks were joined),
the characters stored, and the bytes the page is sent while the cell runs with each message
sent as the output's new last line (`stream_update_html`, what the page gets) against the whole
output sent again (the baseline a naive "replace the output" would cost).

Run: .venv/bin/python bench/outputs_bench.py
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from dialogue.kernel.outputs import OutputCap, fold_output, stored_outputs  # noqa: E402
from dialogue.render import render_output, stream_update_html  # noqa: E402


def progress_messages() -> list[str]:
    msgs = []
    for i in range(5000):
        done = i * 60 // 5000
        msgs.append(f"\r{i / 50:5.1f}%|{'#' * done}{' ' * (60 - done)}| {i}/5000")
    msgs.append("\n")
    return msgs


def chatty_messages() -> list[str]:
    msgs, n = [], 0
    for _ in range(3000):
        lines = []
        for _ in range(5):
            colour = "\x1b[32m" if n % 7 == 0 else ""
            lines.append(f"{colour}step {n:6d} loss {1 / (n + 1):.6f}{'.' * 60}\x1b[0m\n"[:100])
            n += 1
        msgs.append("".join(lines))
    return msgs


def run(name: str, msgs: list[str]) -> None:
    t = time.perf_counter()
    baseline: list[dict] = []
    for m in msgs:
        baseline.append({"output_type": "stream", "name": "stdout", "text": m})
    t_base = time.perf_counter() - t

    t = time.perf_counter()
    cap = OutputCap(10_000_000)
    follower: list[dict] = []
    sent_tail = sent_whole = 0
    for m in msgs:
        for item in cap.add("stream", {"name": "stdout", "text": m}):
            before = follower[-1] if follower else None
            fold_output(follower, item)
            if before is not None:
                tail = stream_update_html(before["text"], follower[-1]["text"])
                sent_tail += len(tail.encode())
            else:
                sent_tail += len(render_output(follower[-1], live=True).encode())
    t_fold = time.perf_counter() - t
    for o in follower[:1]:
        # the baseline's bytes: the whole output rendered again at every message (sampled every
        # 50th message and scaled, rendering all of them would take minutes)
        text, whole = "", 0
        for i, m in enumerate(msgs):
            text += m
            if i % 50 == 0:
                whole += 50 * len(render_output({"output_type": "stream", "name": "stdout",
                                                 "text": text}).encode())
        sent_whole = whole
    stored, _ = cap.finish()
    raw = sum(len(m) for m in msgs)
    print(f"{name}: {len(msgs):,} messages, {raw:,} characters sent by the kernel")
    print(f"  fold (cap + follower + page update): {t_fold * 1000:8.1f} ms "
          f"({t_fold / len(msgs) * 1e6:.1f} us a message); baseline list append "
          f"{t_base * 1000:.1f} ms")
    print(f"  stored: {sum(len(o['text']) for o in stored_outputs(stored)):,} characters in "
          f"{len(stored)} output(s)")
    print(f"  page sent while running: {sent_tail:,} bytes as last lines; "
          f"{sent_whole:,} bytes if the whole output were sent each time "
          f"({sent_whole / max(sent_tail, 1):,.0f}x)")


if __name__ == "__main__":
    run("progress", progress_messages())
    run("chatty", chatty_messages())
