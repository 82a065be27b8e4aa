"""Run metrics on rank 0: every record to ``metrics.jsonl``, each kind also to ``<kind>.csv``, optionally
TensorBoard."""

import csv
import json
from pathlib import Path


class MetricsLog:
    """Appends records to ``output_dir``. ``log(kind, step, values)``: ``kind`` is "train", "eval", ...; the CSV of a
    kind takes its columns from the first record of that kind. A disabled log (other ranks) writes nothing."""

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, tensorboard: bool = False) -> None:
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.writer = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.dir / "tensorboard"))

    def log(self, kind: str, step: int, values: dict[str, float | int | str]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        path = self.dir / f"{kind}.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            if new:
                columns = ["step", *values]
            else:
                with open(path) as existing:
                    columns = next(csv.reader(existing))
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(record)
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
