"""
Progress a user can watch: one line that updates in place on a terminal, and a plain line every
few seconds when stdout is a file or a pipe (a job log), so a long run says where it is, how fast
it goes and how long it has left. Only rank 0 prints under torchrun.

    bar = Progress("unlearning", total=80)
    bar.update(5, loss=4.35, tokens_per_s=3900)   # unlearning 5/80  loss 4.350  3900 tok/s  0:42 left
    bar.close()

    for batch in Each(batches, "NPO reference: batch"):   # the same for a loop over a list
        ...
"""
import os
import sys
import time


def fmt_time(seconds: float) -> str:
    """H:MM:SS or M:SS."""
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_fields(fields: dict) -> str:
    """'name value' pairs: floats with 4 significant digits, tokens/s as a whole number."""
    out = []
    for k, v in fields.items():
        if k == "tokens_per_s":
            out.append(f"{v:.0f} tok/s")
        elif isinstance(v, float):
            out.append(f"{k} {v:.4g}")
        else:
            out.append(f"{k} {v}")
    return "  ".join(out)


class Progress:
    """done/total, the given fields, and the time left (elapsed per unit x units left)."""

    def __init__(self, label: str, total: int, stream=None, every: float = 10.0, start: int = 0):
        self.label, self.total, self.every, self.start = label, total, every, start
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.quiet = int(os.environ.get("RANK", "0")) != 0
        self.t0 = self.last = time.time()
        self.width = 0

    def line(self, done: int, fields: dict) -> str:
        elapsed = time.time() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else float("nan")
        eta = fmt_time(left) + " left" if left == left else "--:-- left"
        parts = [f"{self.label} {done}/{self.total}", fmt_fields(fields), eta]
        return "  ".join(p for p in parts if p)

    def update(self, done: int, **fields) -> None:
        if self.quiet:
            return
        now = time.time()
        if self.tty:
            text = self.line(done, fields)
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
            if done >= self.total:  # finished: the next output starts on a line of its own
                self.stream.write("\n")
                self.width = 0
            self.stream.flush()
        elif now - self.last >= self.every or done == self.total:
            self.stream.write(self.line(done, fields) + "\n")
            self.stream.flush()
            self.last = now

    def close(self, message: str = "") -> None:
        """End the updating line (a newline on a terminal) and print `message` if given."""
        if self.quiet:
            return
        if self.tty and self.width:
            self.stream.write("\n")
        if message:
            self.stream.write(message + "\n")
        self.stream.flush()
        self.width = 0



class Each:
    """The items of `seq` (a list), each iteration with its own progress line that counts an item
    done when the next is asked for: a loop that some other function runs (lume.reference_logps,
    methods.rmu_reference) reports its progress without knowing of it. A list to that function
    in every other way (len, indexing, iterated again)."""

    def __init__(self, seq, label: str, stream=None, every: float = 10.0):
        self.seq, self.label, self.stream, self.every = list(seq), label, stream, every

    def __len__(self):
        return len(self.seq)

    def __getitem__(self, i):
        return self.seq[i]

    def __iter__(self):
        bar = Progress(self.label, len(self.seq), stream=self.stream, every=self.every)
        for i, item in enumerate(self.seq):
            yield item
            bar.update(i + 1)
        bar.close()
