"""How an ingest run ends: the exit codes, the usage error, and the :class:`Summary` it returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Raised for problems with the command line or the output file that no retry can fix."""


@dataclass
class Summary:
    """How a run ended; ``exit_code`` is what the CLI returns."""

    out: Path
    total: int = 0                      # images found
    skipped: int = 0                    # non-image files
    already_done: int = 0               # images that had a line before this run
    new_results: int = 0                # lines written by this run
    succeeded: int = 0                  # over all images (this run and earlier ones)
    failed: dict[str, int] = field(default_factory=dict)  # error code -> images
    missing: int = 0                    # images without a line at the end
    uploaded: int = 0                   # images this run got into a job (accepted + rejected)
    duplicates: int = 0                 # sent again but already in the job
    canceled: int = 0                   # results that came back canceled (not written)
    elapsed_s: float = 0.0
    job_id: str | None = None
    interrupted: bool = False
    error: str | None = None

    @property
    def rate(self) -> float:
        """Results per second of this run."""
        return self.new_results / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.missing else EXIT_OK

    def format(self) -> str:
        """The human summary printed at the end."""
        failed = sum(self.failed.values())
        by_code = ", ".join(f"{c} {n}" for c, n in sorted(self.failed.items()))
        lines = [f"pinfer ingest: {self.total} images -> {self.out}" + (f" (job {self.job_id})" if self.job_id else ""),
                 f"  succeeded  {self.succeeded}",
                 f"  failed     {failed}" + (f"  ({by_code})" if by_code else ""),
                 f"  skipped    {self.skipped} non-image files"]
        if self.already_done:
            lines.append(f"  resumed    {self.already_done} already had a result")
        if self.canceled:
            lines.append(f"  canceled   {self.canceled} (job canceled; not written)")
        if self.missing:
            lines.append(f"  missing    {self.missing} without a result")
        lines.append(f"  elapsed    {self.elapsed_s:.1f} s  ({self.rate:.1f} images/s)")
        return "\n".join(lines)
