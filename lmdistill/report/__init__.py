"""Reports: markdown with PNG plots."""

from lmdistill.report.markdown import write_report

__all__ = ["write_report"]
